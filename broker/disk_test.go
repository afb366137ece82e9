package broker

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// mountTmpfs mounts a tmpfs of size bytes on a new directory and unmounts
// it at the end of the test, after the server that uses it has stopped.
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("a size-capped file system needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// fillDisk writes a file into dir until its file system has about free bytes left.
func fillDisk(t *testing.T, dir string, free int64) string {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	n := int64(st.Bavail)*st.Bsize - free
	if n <= 0 {
		t.Fatalf("the file system already has under %d bytes free", free)
	}
	path := filepath.Join(dir, "ballast")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	for n > 0 {
		w, err := f.Write(chunk[:min(n, int64(len(chunk)))])
		if err != nil {
			t.Fatalf("write ballast: %v", err)
		}
		n -= int64(w)
	}
	return path
}

// failedToStore is the MQTT 5 PUBACK reason of a message the server could
// not store (PROTOCOL.md section 9).
const failedToStore = 0x80

// TestFullDisk fills the data directory's file system past the reserve:
// publishes are refused with an error, what was acknowledged before is
// still delivered and acknowledged, and publishes are taken again once
// space is freed, all without a restart.
func TestFullDisk(t *testing.T) {
	const reserve = 32 << 20
	mnt := mountTmpfs(t, 160<<20)
	s := startServer(t, filepath.Join(mnt, "data"), func(c *config.Config) {
		c.Queue.MinFreeBytes = reserve
		c.Receipts.Delivered = false
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	alice := dialV5(t, s, "alice", nil)
	publish := func(id string) byte {
		t.Helper()
		resp, err := alice.Publish(ctx, &paho5.Publish{QoS: 1, Topic: "inbox/bob", Payload: []byte(`{"id":"` + id + `","text":"hi"}`)})
		if resp == nil {
			t.Fatalf("publish %s: no PUBACK: %v", id, err)
		}
		return resp.ReasonCode
	}

	var accepted []string
	for i := range 50 {
		id := fmt.Sprintf("before-%d", i)
		if code := publish(id); code != 0 {
			t.Fatalf("publish %s with room on disk: reason 0x%x", id, code)
		}
		accepted = append(accepted, id)
	}

	ballast := fillDisk(t, mnt, reserve-(4<<20))
	// The server reads free space periodically: publishes go on being
	// taken until it notices, and every one taken must be delivered.
	for i := 0; ; i++ {
		if ctx.Err() != nil {
			t.Fatal("publishes were still taken with the disk past its reserve")
		}
		id := fmt.Sprintf("filling-%d", i)
		code := publish(id)
		if code == 0 {
			accepted = append(accepted, id)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if code != failedToStore {
			t.Fatalf("publish on a full disk: reason 0x%x, want 0x%x", code, failedToStore)
		}
		break
	}
	if code := publish("refused"); code != failedToStore {
		t.Fatalf("second publish on a full disk: reason 0x%x, want 0x%x", code, failedToStore)
	}
	if _, body := scrape(t, s, "/metrics"); !strings.Contains(body, "chatd_disk_low 1") || !strings.Contains(body, `chatd_refusals_total{code="no_space"}`) {
		t.Error("metrics do not show the low disk and its refusals")
	}

	// Reads and acknowledgements go on while the disk is full.
	bob := mustDial(t, s, "bob", phoneOpt{})
	got := bob.waitFor(len(accepted))
	for i, e := range got[:len(accepted)] {
		if id := innerID(t, e); id != accepted[i] {
			t.Fatalf("bob's message %d = %s, want %s", i, id, accepted[i])
		}
	}
	waitAcked(t, s, "bob", "")

	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	deadline, _ := ctx.Deadline()
	testutil.Eventually(t, time.Until(deadline), func() bool { return publish("after") == 0 },
		"publishes still refused after space was freed")
	if e := bob.waitFor(len(accepted) + 1)[len(accepted)]; innerID(t, e) != "after" {
		t.Fatalf("bob's message after recovery = %s, want after", innerID(t, e))
	}
}
