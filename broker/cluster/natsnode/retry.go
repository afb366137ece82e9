package natsnode

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Attempt bounds one try of UntilAnswered. JetStream answers a request in
// milliseconds once the group it concerns has a leader; in a new cluster,
// where several nodes ask to create the same stream at once, the requests
// that lose the race go unanswered, and waiting out the client's default
// five seconds for each would add up to a slow start.
const Attempt = time.Second

// UntilAnswered calls f, each time with a deadline of Attempt, again while
// it fails for want of an answer (a group electing its leader, a request
// lost to a concurrent one), until ctx ends. f must be idempotent.
func UntilAnswered(ctx context.Context, f func(context.Context) error) error {
	for {
		actx, cancel := context.WithTimeout(ctx, Attempt)
		err := f(actx)
		cancel()
		if err == nil || ctx.Err() != nil || !Unanswered(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// JetStream error codes that mean "not yet" while a cluster forms.
const (
	// errCodeClusterNotAvailable is "system temporarily unavailable".
	errCodeClusterNotAvailable = 10008
	// errCodeNoPeers is "no suitable peers for placement": a peer is not
	// yet known to be online.
	errCodeNoPeers = 10005
)

// Unanswered reports whether err means JetStream gave no answer yet, as
// while its leaders are being elected, rather than a refusal.
func Unanswered(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Code == 503 || apiErr.ErrorCode == errCodeClusterNotAvailable || apiErr.ErrorCode == errCodeNoPeers
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse)
}
