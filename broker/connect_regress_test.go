package broker

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMetricsConnectionsUnderChurn scrapes /metrics while clients connect
// and disconnect: the connection gauge is read from mochi's counter, which
// mochi updates atomically, so under -race a plain read is reported. Once
// the churn is over the gauge counts the clients still connected.
func TestMetricsConnectionsUnderChurn(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			scrape(t, s, "/metrics")
		}
	}()
	for i := range 8 {
		p := mustDial(t, s, fmt.Sprintf("churn%d", i), phoneOpt{noSub: true})
		if i%2 == 0 {
			p.client.Disconnect(50)
			waitDisconnected(t, s, p.user)
		}
	}
	close(stop)
	wg.Wait()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		_, body := scrape(t, s, "/metrics")
		if strings.Contains(body, "\nchatd_connections 4\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never counted the 4 clients left connected:\n%s", body)
		}
	}
}
