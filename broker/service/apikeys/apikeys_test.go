package apikeys_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/broker/service/apikeys"
)

// stores are every Store implementation; each runs the same contract.
var stores = []struct {
	name string
	open func(t *testing.T) (a, b apikeys.Store) // two views of one store
}{
	{"file", func(t *testing.T) (apikeys.Store, apikeys.Store) {
		path := filepath.Join(t.TempDir(), apikeys.FileName)
		return apikeys.NewFile(path), apikeys.NewFile(path)
	}},
	{"kv", func(t *testing.T) (apikeys.Store, apikeys.Store) {
		nodes := natstest.Cluster(t, 3)
		open := func(i int) apikeys.Store {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			s, err := apikeys.NewKV(ctx, nodes[i].JetStream(), "test-apikeys", 3)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
		return open(0), open(2)
	}},
}

// TestStoreContract checks each Store: a key made in one view works in
// the other (another process, another node) at once, a wrong secret or a
// revoked key does not, and scopes are kept.
func TestStoreContract(t *testing.T) {
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			a, b := st.open(t)
			now := time.Unix(1764145476, 0)
			k, token, err := apikeys.New("billing", []string{"send", "read", "send"}, now)
			if err != nil {
				t.Fatal(err)
			}
			if !apikeys.IsKey(token) || strings.Contains(token, k.Hash) {
				t.Fatalf("token %q: want a chatd_ key that does not hold its stored hash", token)
			}
			if _, err := apikeys.Check(b, token); err == nil {
				t.Fatal("a key not stored yet passed")
			}
			if err := a.Put(k); err != nil {
				t.Fatal(err)
			}
			got, err := apikeys.Check(b, token)
			if err != nil {
				t.Fatalf("check in the other view: %v", err)
			}
			if got.Name != "billing" || !got.Allows("send") || !got.Allows("read") || got.Allows("erase") || len(got.Scopes) != 2 || got.Created != now.Unix() {
				t.Errorf("key %+v: want billing with send and read", got)
			}
			for _, bad := range []string{
				token[:len(token)-1] + "x",   // wrong secret
				"chatd_" + k.ID,              // no secret
				"chatd__x",                   // no ID
				"chatd_../../etc_x",          // no such ID
				"eyJhbGciOiJIUzI1NiJ9.e30.x", // a JWT
			} {
				if _, err := apikeys.Check(b, bad); err == nil {
					t.Errorf("%q passed", bad)
				}
			}
			k2, _, err := apikeys.New("bot", []string{"send"}, now)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Put(k2); err != nil {
				t.Fatal(err)
			}
			list, err := a.List()
			if err != nil || len(list) != 2 {
				t.Fatalf("list %+v, %v: want 2 keys", list, err)
			}
			if err := b.Delete(k.ID); err != nil {
				t.Fatal(err)
			}
			if _, err := apikeys.Check(a, token); err == nil {
				t.Error("revoked key passed")
			}
			if err := a.Delete(k.ID); !errors.Is(err, apikeys.ErrUnknown) {
				t.Errorf("second revoke: %v, want ErrUnknown", err)
			}
			if list, err := b.List(); err != nil || len(list) != 1 || list[0].ID != k2.ID {
				t.Errorf("list %+v, %v: want only the bot key", list, err)
			}
		})
	}
}

// TestNewRefuses checks what New refuses, with errors that say why.
func TestNewRefuses(t *testing.T) {
	for _, c := range []struct {
		name   string
		scopes []string
		want   string
	}{
		{"", []string{"send"}, "key name"},
		{"a b", []string{"send"}, "key name"},
		{"ok", nil, "at least one scope"},
		{"ok", []string{"admin"}, `unknown scope "admin"`},
	} {
		if _, _, err := apikeys.New(c.name, c.scopes, time.Now()); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("New(%q, %v) = %v, want %q", c.name, c.scopes, err, c.want)
		}
	}
}

// TestFileConcurrentChanges runs two writers at once, as two `chatd
// apikey create` commands would: the file keeps both keys.
func TestFileConcurrentChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), apikeys.FileName)
	var wg sync.WaitGroup
	const n = 20
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, _, err := apikeys.New("k", []string{"read"}, time.Unix(int64(i), 0))
			if err == nil {
				err = apikeys.NewFile(path).Put(k)
			}
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	list, err := apikeys.NewFile(path).List()
	if err != nil || len(list) != n {
		t.Fatalf("%d keys, %v: want %d", len(list), err, n)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v, %v: want 0600", st.Mode(), err)
	}
}
