package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/peers"
	"github.com/chatd/chatd/broker/queue"
	"github.com/chatd/chatd/broker/queue/badgerq"
	"github.com/chatd/chatd/broker/queue/jsqueue"
	"github.com/chatd/chatd/config"
)

// Both backends are stores.
var (
	_ queue.Store = (*badgerq.Store)(nil)
	_ queue.Store = (*jsqueue.Store)(nil)
)

// clusterPrefix starts the subjects of the cluster's notices and streams.
const clusterPrefix = "chatd"

// cluster is what cluster mode adds to a node.
type cluster struct {
	node *natsnode.Node
	// local is a Badger database of the node's own: its record of the
	// presence it published (last-seen times), which is not shared.
	local *badger.DB
	// bus sends this node's notices from the start, and listens to its
	// peers' once join starts it.
	bus  *peers.Bus
	name string
	// queue is the node's JetStream queue, told of devices its peers remove.
	queue *jsqueue.Store
}

// startCluster starts or joins NATS, makes the bus to the peers (which
// sends now and listens once join starts it), and opens the JetStream
// queue on the clock now; onCommit observes each batch of publishes,
// onDeleted is told of the messages every device acknowledged.
func startCluster(cfg config.Config, log *slog.Logger, now func() time.Time, onCommit func(int, time.Duration), onDeleted queue.DeletedFunc) (*cluster, queue.Store, error) {
	c := &cluster{name: cfg.Cluster.Node}
	ncfg := natsnode.Config{
		URL:         cfg.Cluster.URL,
		Name:        cfg.Cluster.Node,
		Dir:         filepath.Join(cfg.DataDir, "jetstream"),
		Listen:      cfg.Cluster.NATSListen,
		ClusterName: cfg.Cluster.Name,
		Logger:      log.With("component", "nats"),
		Password:    cfg.Cluster.Password,
		CredsFile:   cfg.Cluster.Credentials,
	}
	if t := cfg.Cluster.TLS; t.Enabled() {
		ncfg.TLS = &natsnode.TLSFiles{CertFile: t.CertFile, KeyFile: t.KeyFile, CAFile: t.CAFile}
	} else if cfg.Cluster.URL == "" && cfg.Cluster.Name != "" {
		log.Warn("cluster.tls is not set: NATS routes between the nodes are not encrypted; set it unless they talk over a private network")
	}
	// queue.sync is the JetStream server's fsync in cluster mode: Badger
	// holds no queued message there.
	ncfg.SyncAlways, ncfg.SyncInterval = jetstreamSync(cfg.Queue)
	if cfg.Queue.Sync == config.SyncNone && cfg.Cluster.URL == "" {
		log.Info("queue.sync none: JetStream cannot turn fsync off, so it fsyncs on its own interval",
			"sync_interval", natsnode.DefaultSyncInterval)
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
	c.bus = peers.New(peers.Options{Conn: node.Conn(), Node: c.name, Prefix: clusterPrefix, Logger: log.With("component", "peers")})
	q, err := jsqueue.Open(context.Background(), jsqueue.Options{
		Conn:      node.Conn(),
		Settings:  clusterQueueSettings(cfg),
		Shards:    cfg.Cluster.Shards,
		Replicas:  cfg.Cluster.Replicas,
		Prefix:    clusterPrefix,
		Logger:    log.With("component", "jsqueue"),
		OnCommit:  onCommit,
		OnDeleted: onDeleted,
		Now:       now,
	})
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("cluster queue: %w", err), c.close())
	}
	c.queue = q
	return c, q, nil
}

// join starts listening to the peers' notices and learns who is online
// on them, before the node takes connections.
func (c *cluster) join(log *slog.Logger, h peers.Handlers) error {
	if err := c.bus.Start(h); err != nil {
		return fmt.Errorf("join cluster: %w", err)
	}
	if err := c.bus.SyncPresence(presenceSyncWait); err != nil {
		log.Warn("presence of the other nodes not known yet", "error", err)
	}
	return nil
}

// presenceSyncWait is how long a starting node collects its peers' online users.
const presenceSyncWait = time.Second

// close stops what startCluster and join started, after the queue is closed.
func (c *cluster) close() error {
	var err error
	if c.bus != nil {
		err = c.bus.Close()
	}
	if c.local != nil {
		err = errors.Join(err, c.local.Close())
	}
	c.node.Shutdown()
	return err
}

// ClusterStatus is the answer of GET /cluster/status: this node, the
// chatd nodes it hears, and JetStream's view of every Raft group.
type ClusterStatus struct {
	// Node is the answering node's name.
	Node string `json:"node"`
	// Peers are the other chatd nodes heard from lately.
	Peers []peers.Peer `json:"peers"`
	// Quorum reports whether the meta group and every stream have a
	// leader: every queue can be written.
	Quorum bool `json:"quorum"`
	// Lagging lists the replicas not caught up, as "group/server".
	Lagging []string `json:"lagging"`
	natsnode.Status
}

// statusWait bounds how long GET /cluster/status asks JetStream.
const statusWait = 10 * time.Second

// status gathers the node's ClusterStatus.
func (c *cluster) status(ctx context.Context) (ClusterStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, statusWait)
	defer cancel()
	st, err := c.node.Status(ctx)
	if err != nil {
		return ClusterStatus{}, err
	}
	return ClusterStatus{Node: c.name, Peers: c.bus.Peers(), Quorum: st.Quorum(), Lagging: st.Lagging(), Status: st}, nil
}
