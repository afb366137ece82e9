package mochi

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestCloseWhileClientsLeave: shutting mochi down through Guard.CloseClients
// (one walk of Clients.GetAll, as chatd does) while clients disconnect by
// themselves ends within a bound, every connection with it. Told of the
// shutdown first, Forget deletes nothing; not told, it deletes each
// persistent client as it ends, meanwhile the walk goes on: a read lock
// taken once cannot deadlock against those deletes, as mochi's
// GetByListener can (see TestForgetWhileMapIsRead).
func TestCloseWhileClientsLeave(t *testing.T) {
	const n = 20
	for _, tell := range []bool{true, false} {
		t.Run(fmt.Sprintf("hook told=%v", tell), func(t *testing.T) {
			ms := startMochi(t, mochiOptions{registry: new(Registry)})
			clients := make([]*rawClient, n)
			for i := range clients {
				clients[i] = ms.connect(t, session{id: fmt.Sprintf("bob/d%d", i), persistent: true})
				ms.client(t, clients[i])
			}

			if tell {
				ms.hook.closing.Store(true) // before anyone leaves: chatd tells its hook first
			}
			var leaving sync.WaitGroup
			for _, c := range clients[:n/2] {
				leaving.Add(1)
				go func() {
					defer leaving.Done()
					c.conn.Close()
				}()
			}
			closed := make(chan error, 1)
			go func() { closed <- ms.closeTelling(tell) }()
			select {
			case err := <-closed:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(wait):
				t.Fatal("mochi's Close did not return: the shutdown walk is stuck")
			}
			leaving.Wait()
			for _, c := range clients[n/2:] {
				waitClosed(t, c.conn, wait)
			}
			// mochi's Close waits for every connection's goroutine.
			if got := ms.hook.endedCount(); got != n {
				t.Fatalf("OnDisconnect ran for %d of %d clients", got, n)
			}
			want := 0
			if tell {
				want = n
			}
			if got := len(ms.srv.Clients.GetAll()); got != want {
				t.Fatalf("%d clients left in mochi's map, want %d", got, want)
			}
		})
	}
}
