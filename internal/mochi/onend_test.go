package mochi

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/chatd/chatd/internal/testutil"
)

// TestGuardOnEndAfterFailedConnack: a client admitted by the hooks whose
// CONNACK mochi cannot write (its connection is gone by then) gets no
// OnDisconnect from mochi v2.7.9 and stays in mochi's client map, clean
// session or not; Guard.OnEnd is still called, once, with the client's
// own connection. The registry entry it leaves goes once the client ID
// connects again and leaves.
func TestGuardOnEndAfterFailedConnack(t *testing.T) {
	for _, persistent := range []bool{true, false} {
		t.Run(fmt.Sprintf("persistent=%v", persistent), func(t *testing.T) {
			s := session{id: "bob/phone", persistent: persistent}
			var (
				mu      sync.Mutex
				ended   []net.Conn
				failing atomic.Bool
				dropped atomic.Pointer[mqtt.Client]
			)
			failing.Store(true)
			registry := new(Registry)
			ms := startMochi(t, mochiOptions{
				registry: registry,
				onEnd: func(c net.Conn) {
					mu.Lock()
					defer mu.Unlock()
					ended = append(ended, c)
				},
				// The connection goes after the hooks admitted the
				// client and before mochi writes the CONNACK.
				onEstablish: func(cl *mqtt.Client) {
					if failing.Load() {
						dropped.Store(cl)
						cl.Net.Conn.Close()
					}
				},
			})
			endedConns := func() []net.Conn {
				mu.Lock()
				defer mu.Unlock()
				return append([]net.Conn(nil), ended...)
			}

			c := ms.dial(t)
			c.send(connectPacket(s))
			waitClosed(t, c.conn, wait)
			testutil.Eventually(t, wait, func() bool { return len(endedConns()) == 1 }, "OnEnd is called")
			cl := dropped.Load()
			if got := endedConns(); got[0] != cl.Net.Conn {
				t.Fatalf("OnEnd got %v, not the client's connection %v", got[0], cl.Net.Conn)
			}
			// OnEnd runs after mochi is done with the connection: an
			// OnDisconnect would have run by now.
			if ms.hook.hasEnded(cl) {
				t.Fatal("mochi ran OnDisconnect after a failed CONNACK: Guard.OnEnd and the Registry's note may no longer be needed")
			}
			if got, ok := ms.inMap(s.id); !ok || got != cl {
				t.Fatalf("mochi's client map holds %p (found %v), want the client whose CONNACK failed, %p", got, ok, cl)
			}
			if held, _ := registry.held(s.id); held != cl {
				t.Fatal("the registry dropped the client although mochi ran no OnDisconnect")
			}

			failing.Store(false)
			again := ms.connect(t, s)
			againCl := ms.client(t, again)
			if err := again.conn.Close(); err != nil {
				t.Fatal(err)
			}
			ms.waitEnded(t, againCl)
			testutil.Eventually(t, wait, func() bool {
				_, ok := ms.inMap(s.id)
				return !ok
			}, "the client ID leaves mochi's client map")
			if _, n := registry.held(s.id); n != 0 {
				t.Fatalf("the registry still holds %d connections", n)
			}
			if got := endedConns(); len(got) != 2 || got[1] != againCl.Net.Conn {
				t.Fatalf("OnEnd got %d connections, want each connection once", len(got))
			}
		})
	}
}
