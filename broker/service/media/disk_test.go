package media

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"
)

// newDisk returns a Disk in a fresh directory and that directory.
func newDisk(t testing.TB) (*Disk, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "media")
	d, err := NewDisk(dir)
	if err != nil {
		t.Fatalf("NewDisk: %v", err)
	}
	return d, dir
}

// entries returns the sorted names in dir.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("read dir: %v", err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	slices.Sort(names)
	return names
}

// sum returns the hex SHA-256 of b.
func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// randomBytes returns n deterministic pseudo-random bytes.
func randomBytes(t testing.TB, n int, seed byte) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(generator(int64(n), seed), b); err != nil {
		t.Fatalf("generate: %v", err)
	}
	return b
}

func TestValidID(t *testing.T) {
	tests := []struct {
		id   string
		want bool
	}{
		{"0123456789abcdef0123456789abcdef", true},
		{"", false},
		{"../x", false},
		{"..", false},
		{"0123456789abcdef0123456789abcde", false},   // 31
		{"0123456789abcdef0123456789abcdef0", false}, // 33
		{"0123456789ABCDEF0123456789ABCDEF", false},  // upper case would alias on case-insensitive file systems
		{"0123456789abcdef0123456789abcdeg", false},
		{"../../../../../../../../etc/passwd", false},
		{"0123456789abcdef/123456789abcdef", false},
		{".tmp-0123456789abcdef0123456789ab", false},
		{"0123456789abcdef0123456789abcd\x00f", false},
	}
	for _, tt := range tests {
		if got := validID(tt.id); got != tt.want {
			t.Errorf("validID(%q) = %v, want %v", tt.id, got, tt.want)
		}
	}
}

// TestDiskMalformedIDsTouchNothing checks that ids shaped like paths
// reach neither a file next to the directory nor a leftover inside it.
// TestStoreMalformedIDs covers the rest of the malformed ids.
func TestDiskMalformedIDsTouchNothing(t *testing.T) {
	d, dir := newDisk(t)
	// Targets an escaping id would reach: a file next to dir, and an
	// upload-shaped directory inside it.
	secret := filepath.Join(filepath.Dir(dir), "secret")
	if err := os.WriteFile(secret, []byte("top secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(dir, ".tmp-abc")
	if err := os.Mkdir(leftover, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "..", ".", "/", "../secret", "../media/.tmp-abc", ".tmp-abc"} {
		t.Run(fmt.Sprintf("%q", id), func(t *testing.T) {
			if f, _, err := d.Open(t.Context(), id); !errors.Is(err, ErrNotFound) {
				if f != nil {
					f.Close()
				}
				t.Errorf("Open = %v, want ErrNotFound", err)
			}
			if err := d.Delete(t.Context(), id); !errors.Is(err, ErrNotFound) {
				t.Errorf("Delete = %v, want ErrNotFound", err)
			}
		})
	}
	for _, p := range []string{secret, leftover} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was touched: %v", p, err)
		}
	}
}

// TestDiskExpireFinishesDelete checks that a deletion that failed half
// way is finished by the next sweep, which does not count it.
func TestDiskExpireFinishesDelete(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	d, dir := newDisk(t)
	d.Now = func() time.Time { return t0 }
	kept := putTo(t, d, []byte("keep me"))
	if err := os.Mkdir(filepath.Join(dir, trashPrefix+"0123456789abcdef0123456789abcdef"), 0o700); err != nil {
		t.Fatal(err)
	}
	// Strictly before: the upload created at t0 stays.
	if n, err := d.Expire(t.Context(), t0); n != 0 || err != nil {
		t.Errorf("Expire = %d, %v; want 0, nil", n, err)
	}
	if names := entries(t, dir); !slices.Equal(names, []string{kept.ID}) {
		t.Errorf("dir holds %v, want only %s", names, kept.ID)
	}
}

func TestNewDiskRemovesLeftovers(t *testing.T) {
	d, dir := newDisk(t)
	info := putTo(t, d, []byte("keep me"))
	for _, p := range []string{
		filepath.Join(dir, tmpPrefix+"123", dataFile),
		filepath.Join(dir, trashPrefix+info.ID+"x", metaFile),
	} {
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	d2, err := NewDisk(dir)
	if err != nil {
		t.Fatalf("NewDisk: %v", err)
	}
	if names := entries(t, dir); !slices.Equal(names, []string{info.ID}) {
		t.Errorf("dir holds %v, want only %s", names, info.ID)
	}
	if got, _ := readFrom(t, d2, info.ID); string(got) != "keep me" {
		t.Errorf("upload reads %q after restart", got)
	}
}

func TestNewDiskErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"", file, filepath.Join(file, "sub")} {
		if _, err := NewDisk(dir); err == nil {
			t.Errorf("NewDisk(%q) succeeded", dir)
		}
	}
}

// generator returns a reader of n deterministic pseudo-random bytes made on
// the fly, never held in memory whole.
func generator(n int64, seed byte) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{seed}), n)
}

// allocated returns the bytes allocated by the process so far.
func allocated() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.TotalAlloc
}

func TestDiskPutStreams(t *testing.T) {
	const size = 32 << 20
	d, _ := newDisk(t)
	want := sha256.New()
	if _, err := io.Copy(want, generator(size, 7)); err != nil {
		t.Fatal(err)
	}
	before := allocated()
	info, err := d.Put(t.Context(), "alice", "video/mp4", generator(size, 7), size)
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	// Cumulative allocation, unlike the live heap, does not depend on when
	// the GC runs: holding the upload would allocate at least its size.
	if n := allocated() - before; n > size/8 {
		t.Errorf("Put of %d bytes allocated %d bytes: the upload is buffered", size, n)
	}
	if info.Size != size || info.SHA256 != hex.EncodeToString(want.Sum(nil)) {
		t.Errorf("Put = size %d sha %s, want %d %x", info.Size, info.SHA256, size, want.Sum(nil))
	}
}

func BenchmarkDiskPut(b *testing.B) {
	d, _ := newDisk(b)
	data := randomBytes(b, 1<<20, 8)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := d.Put(b.Context(), "bench", "application/octet-stream", bytes.NewReader(data), int64(len(data))); err != nil {
			b.Fatal(err)
		}
	}
}

func TestDiskCorruptMetadata(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	d, dir := newDisk(t)
	d.Now = func() time.Time { return t0 }
	bad := putTo(t, d, []byte("bad"))
	good := putTo(t, d, []byte("good"))
	if err := os.WriteFile(filepath.Join(dir, bad.ID, metaFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := d.Open(t.Context(), bad.ID); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Open of corrupt upload = %v, want an error other than ErrNotFound", err)
	}
	// One broken upload neither stops the sweep nor goes unreported.
	n, err := d.Expire(t.Context(), t0.Add(time.Hour))
	if n != 1 || err == nil {
		t.Errorf("Expire = %d, %v; want 1 and an error", n, err)
	}
	if _, _, err := d.Open(t.Context(), good.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("expired upload: Open = %v, want ErrNotFound", err)
	}
}
