package broker

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
)

// TestBackupRestore follows docs/operations.md's backup of a node: stop
// it, archive its data dir with tar, and restore the archive into an
// empty directory on the same or another machine: the restored node has
// every queued message, in order, for the devices it knew.
func TestBackupRestore(t *testing.T) {
	if _, err := exec.LookPath("tar"); err != nil {
		t.Skip("no tar on this machine")
	}
	dir := t.TempDir()
	s := startServer(t, dir, nil)
	bob := mustDial(t, s, "bob", phoneOpt{})
	bob.client.Disconnect(100)
	testutil.Eventually(t, 10*time.Second, func() bool { return !fed(s, "bob") }, "bob's disconnect never reached the server")
	alice := mustDial(t, s, "alice", phoneOpt{noSub: true})
	const n = 100
	for i := range n {
		alice.send("bob", fmt.Sprintf("m-%d", i), "")
	}
	stopServer(t, s)

	archive := filepath.Join(t.TempDir(), "chatd-backup.tar.gz")
	restored := t.TempDir()
	for _, args := range [][]string{
		{"tar", "-C", dir, "-czf", archive, "."},
		{"tar", "-C", restored, "-xzf", archive},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	s = startServer(t, restored, nil)
	bob = mustDial(t, s, "bob", phoneOpt{})
	got := bob.waitFor(n)
	for i, e := range got[:n] {
		if id := innerID(t, e); id != fmt.Sprintf("m-%d", i) {
			t.Fatalf("restored message %d: %s, want m-%d", i, id, i)
		}
	}
}
