package broker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go"

	"github.com/chatd/chatd/broker/jsqueue"
	"github.com/chatd/chatd/broker/natsnode"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/config"
)

// store is the durable queue behind a node: queue.Store (Badger) alone,
// jsqueue.Store (JetStream) in a cluster.
type store interface {
	Append(r *queue.Request)
	TryAppend(r *queue.Request) bool
	Read(user string, after uint64, max int) ([]queue.Message, error)
	Attach(user, device string, transient bool) (cursor uint64, subscribed bool, err error)
	MayAttach(user, device string) (bool, error)
	Cursor(user, device string) (uint64, error)
	SetSubscribed(user, device string, subscribed bool)
	Ack(user, device string, cursor uint64)
	Detach(user, device string)
	Depth(user string) (uint64, error)
	Head(user string) (uint64, error)
	Stats() queue.Stats
	Undelivered() uint64
	DiskSize() (int64, int64)
	FreeBytes() int64
	LowDisk() bool
	Close() error
}

// storedSubject carries, in a cluster, each stored message to every node,
// so that a node feeds its own devices of the recipient at once instead of
// finding the message at their next read.
const storedSubject = "chatd.stored"

// cluster is what cluster mode adds to a node.
type cluster struct {
	node *natsnode.Node
	// local keeps what is not clustered yet (groups, presence) in Badger.
	local *badger.DB
	sub   *nats.Subscription
	name  string
}

// startCluster starts or joins NATS and opens the JetStream queue.
// onStored is called for every message stored by any node.
func startCluster(cfg config.Config, log *slog.Logger, onStored func(string, queue.Message), onCommit func(int, time.Duration)) (*cluster, store, error) {
	c := &cluster{name: cfg.Cluster.Node}
	ncfg := natsnode.Config{
		URL:         cfg.Cluster.URL,
		Name:        cfg.Cluster.Node,
		Dir:         filepath.Join(cfg.DataDir, "jetstream"),
		Listen:      cfg.Cluster.NATSListen,
		ClusterName: cfg.Cluster.Name,
		SyncAlways:  cfg.Queue.Sync == config.SyncAlways,
		Logger:      log.With("component", "nats"),
	}
	if cfg.Cluster.Name != "" {
		ncfg.ClusterListen = cfg.Cluster.Listen
		for _, r := range strings.Split(cfg.Cluster.Routes, ",") {
			if r = strings.TrimSpace(r); r != "" {
				ncfg.Routes = append(ncfg.Routes, r)
			}
		}
	}
	node, err := natsnode.Start(context.Background(), ncfg)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: %w", err)
	}
	c.node = node
	local, err := badger.Open(badger.DefaultOptions(filepath.Join(cfg.DataDir, "local")).
		WithLogger(nil).WithNumVersionsToKeep(1))
	if err != nil {
		node.Shutdown()
		return nil, nil, fmt.Errorf("open local store: %w", err)
	}
	c.local = local
	q, err := jsqueue.Open(context.Background(), jsqueue.Options{
		Conn:     node.Conn(),
		Queue:    cfg.Queue,
		Shards:   cfg.Cluster.Shards,
		Replicas: cfg.Cluster.Replicas,
		Logger:   log.With("component", "jsqueue"),
		OnStored: func(user string, m queue.Message) {
			onStored(user, m)
			c.announce(log, user, m)
		},
		OnCommit: onCommit,
	})
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("cluster queue: %w", err), c.close())
	}
	c.sub, err = node.Conn().Subscribe(storedSubject, func(msg *nats.Msg) {
		origin, user, m, err := decodeStored(msg.Data)
		if err != nil {
			log.Error("bad stored notice", "error", err)
			return
		}
		if origin != c.name {
			onStored(user, m)
		}
	})
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("subscribe %s: %w", storedSubject, err), q.Close(), c.close())
	}
	return c, q, nil
}

// announce tells the other nodes that m was stored for user. A lost
// notice delays a delivery until the device's next read; it loses nothing.
func (c *cluster) announce(log *slog.Logger, user string, m queue.Message) {
	if err := c.node.Conn().Publish(storedSubject, encodeStored(c.name, user, m)); err != nil {
		log.Warn("announce stored message", "user", user, "error", err)
	}
}

// close stops what startCluster started, after the queue is closed.
func (c *cluster) close() error {
	var err error
	if c.sub != nil {
		err = c.sub.Unsubscribe()
	}
	if c.local != nil {
		err = errors.Join(err, c.local.Close())
	}
	c.node.Shutdown()
	return err
}

// encodeStored lays out a notice: origin, user and meta with 2-byte
// lengths, the sequence, then the envelope to the end.
func encodeStored(origin, user string, m queue.Message) []byte {
	b := make([]byte, 0, 14+len(origin)+len(user)+len(m.Meta)+len(m.Data))
	for _, s := range [][]byte{[]byte(origin), []byte(user), m.Meta} {
		b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
		b = append(b, s...)
	}
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	return append(b, m.Data...)
}

// decodeStored reads a notice made by encodeStored.
func decodeStored(b []byte) (origin, user string, m queue.Message, err error) {
	var parts [3][]byte
	for i := range parts {
		if len(b) < 2 || len(b) < 2+int(binary.BigEndian.Uint16(b)) {
			return "", "", m, errors.New("truncated notice")
		}
		n := int(binary.BigEndian.Uint16(b))
		parts[i], b = b[2:2+n], b[2+n:]
	}
	if len(b) < 8 {
		return "", "", m, errors.New("truncated notice")
	}
	m = queue.Message{Seq: binary.BigEndian.Uint64(b), Meta: parts[2], Data: b[8:]}
	return string(parts[0]), string(parts[1]), m, nil
}
