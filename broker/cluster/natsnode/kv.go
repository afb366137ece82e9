package natsnode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// kvOperationHeader marks a KV stream message as a deletion, not a value.
const kvOperationHeader = "KV-Operation"

// KVLast returns key's latest value and revision in the KV bucket as the
// bucket's stream leader has them; ok is false when the key has none
// (never set, deleted or purged). jetstream.KeyValue.Get reads with
// direct gets, which any replica answers, one that has not yet applied
// the latest write included: a value just changed or deleted on another
// node may come back as it was. What must hold at once on every node (a
// group's members, a revoked API key) reads here.
func KVLast(ctx context.Context, js jetstream.JetStream, bucket, key string) (rev uint64, v []byte, ok bool, err error) {
	req, err := json.Marshal(msgGetRequest{LastFor: "$KV." + bucket + "." + key})
	if err != nil {
		return 0, nil, false, fmt.Errorf("encode get: %w", err)
	}
	subject := apiPrefix(js.Options()) + "STREAM.MSG.GET.KV_" + bucket
	m, err := js.Conn().RequestWithContext(ctx, subject, req)
	if err != nil {
		return 0, nil, false, fmt.Errorf("bucket %s: %w", bucket, err)
	}
	var resp msgGetResponse
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, nil, false, fmt.Errorf("bucket %s: decode answer: %w", bucket, err)
	}
	if resp.Error != nil {
		if resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound {
			return 0, nil, false, nil
		}
		return 0, nil, false, fmt.Errorf("bucket %s: %w", bucket, resp.Error)
	}
	msg := resp.Message
	if msg == nil {
		return 0, nil, false, fmt.Errorf("bucket %s: answer without a message", bucket)
	}
	if len(msg.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(msg.Header)
		if err != nil {
			return 0, nil, false, fmt.Errorf("bucket %s: headers: %w", bucket, err)
		}
		// A delete or purge marker, or the server's marker of a removal.
		if h.Get(kvOperationHeader) != "" || h.Get(jetstream.MarkerReasonHeader) != "" {
			return msg.Sequence, nil, false, nil
		}
	}
	return msg.Sequence, msg.Data, true, nil
}

type msgGetRequest struct {
	LastFor string `json:"last_by_subj"`
}

type msgGetResponse struct {
	Error   *jetstream.APIError `json:"error,omitempty"`
	Message *struct {
		Sequence uint64 `json:"seq"`
		Header   []byte `json:"hdrs,omitempty"`
		Data     []byte `json:"data,omitempty"`
	} `json:"message,omitempty"`
}

// apiPrefix is the JetStream API subject prefix js uses.
func apiPrefix(o jetstream.JetStreamOptions) string {
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return jetstream.DefaultAPIPrefix
}

// OpenKV creates the KV bucket, or updates its configuration, keeping one
// value per key on disk with replicas copies, and retries until JetStream
// answers (a meta leader may still be elected) or ctx ends.
func OpenKV(ctx context.Context, js jetstream.JetStream, bucket, description string, replicas int) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	err := UntilAnswered(ctx, func(ctx context.Context) (err error) {
		kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      bucket,
			Description: description,
			History:     1,
			Replicas:    replicas,
			Storage:     jetstream.FileStorage,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("bucket %s: %w", bucket, err)
	}
	return kv, nil
}

// KVReplay reads the entries a new watch replays, the bucket's current
// values, calling fn for each, until the nil entry that ends the replay.
// The watch stays the caller's, to follow the changes after it or stop.
func KVReplay(ctx context.Context, w jetstream.KeyWatcher, fn func(jetstream.KeyValueEntry) error) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("watch ended before the replay did")
			}
			if e == nil {
				return nil
			}
			if err := fn(e); err != nil {
				return err
			}
		}
	}
}
