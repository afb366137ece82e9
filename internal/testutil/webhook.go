package testutil

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Clock is a clock tests set by hand, starting at a fixed date.
type Clock struct{ ns atomic.Int64 }

// NewClock returns a Clock at 2025-06-01 12:00 UTC.
func NewClock() *Clock {
	c := &Clock{}
	c.ns.Store(time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

// Now returns the clock's time.
func (c *Clock) Now() time.Time { return time.Unix(0, c.ns.Load()) }

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// Webhook starts a test server running h, closed when the test ends.
func Webhook(t testing.TB, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// BlockingWebhook starts a test server whose handler reports each request
// on arrived and then blocks until open is called. Open is also called when
// the test ends, before the server is closed, since closing the server
// waits for its handlers.
func BlockingWebhook(t testing.TB) (srv *httptest.Server, arrived <-chan struct{}, open func()) {
	t.Helper()
	gate := make(chan struct{})
	arrivals := make(chan struct{}, 16)
	srv = Webhook(t, func(w http.ResponseWriter, r *http.Request) {
		arrivals <- struct{}{}
		<-gate
	})
	var once sync.Once
	open = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	return srv, arrivals, open
}
