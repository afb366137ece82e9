package apikeys

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
)

// kvTimeout bounds each request to the bucket.
const kvTimeout = 5 * time.Second

// KV is the Store of a cluster: a replicated JetStream KV bucket that
// every node and `chatd apikey --cluster` share. Each check reads the
// bucket, so a revocation holds on every node at once.
type KV struct {
	kv     jetstream.KeyValue
	js     jetstream.JetStream
	bucket string
}

// NewKV opens the bucket named bucket, creating it with replicas copies;
// ctx bounds the setup.
func NewKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int) (*KV, error) {
	kv, err := natsnode.OpenKV(ctx, js, bucket, "chatd API keys", replicas)
	if err != nil {
		return nil, fmt.Errorf("API keys: %w", err)
	}
	return &KV{kv: kv, js: js, bucket: bucket}, nil
}

// Get returns the key of id.
func (s *KV) Get(id string) (Key, error) {
	if !validID(id) {
		return Key{}, ErrUnknown
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	// The leader's copy: a key revoked on another node must fail here
	// at once, which a direct get from a lagging replica would not. Every
	// request of this store is asked again while the bucket elects its
	// leader, which a new bucket does just after it is made; each one is
	// idempotent.
	var v []byte
	var ok bool
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) (err error) {
		_, v, ok, err = natsnode.KVLast(ctx, s.js, s.bucket, id)
		return err
	})
	if err != nil {
		return Key{}, fmt.Errorf("API key %s: %w", id, err)
	}
	if !ok {
		return Key{}, ErrUnknown
	}
	return decode(v)
}

// List returns every key, by ID. The keys are those the bucket's stream
// leader holds subjects for (a listing through a consumer may miss a key
// just put on another node), each read at the leader as Get does.
func (s *KV) List() ([]Key, error) {
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	prefix := "$KV." + s.bucket + "."
	var info *jetstream.StreamInfo
	err := natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		stream, err := s.js.Stream(ctx, "KV_"+s.bucket)
		if err != nil {
			return err
		}
		info, err = stream.Info(ctx, jetstream.WithSubjectFilter(prefix+">"))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("API keys: %w", err)
	}
	var out []Key
	for subject := range info.State.Subjects {
		k, err := s.Get(strings.TrimPrefix(subject, prefix))
		if errors.Is(err, ErrUnknown) {
			continue // revoked: its purge marker is the subject's last message
		}
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	slices.SortFunc(out, func(a, b Key) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Put adds or replaces k.
func (s *KV) Put(k Key) error {
	b, err := json.Marshal(k)
	if err != nil {
		return fmt.Errorf("API key %s: %w", k.ID, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	err = natsnode.UntilAnswered(ctx, func(ctx context.Context) error {
		_, err := s.kv.Put(ctx, k.ID, b)
		return err
	})
	if err != nil {
		return fmt.Errorf("API key %s: %w", k.ID, err)
	}
	return nil
}

// Delete revokes the key of id.
func (s *KV) Delete(id string) error {
	if _, err := s.Get(id); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	if err := natsnode.UntilAnswered(ctx, func(ctx context.Context) error { return s.kv.Purge(ctx, id) }); err != nil {
		return fmt.Errorf("API key %s: %w", id, err)
	}
	return nil
}

func decode(b []byte) (Key, error) {
	var k Key
	if err := json.Unmarshal(b, &k); err != nil {
		return Key{}, fmt.Errorf("API key: %w", err)
	}
	return k, nil
}
