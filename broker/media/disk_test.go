package media

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
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

// put stores data for alice, failing the test on error.
func put(t *testing.T, d *Disk, data []byte) Info {
	t.Helper()
	info, err := d.Put(t.Context(), "alice", "application/octet-stream", bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return info
}

// read returns the content and Info of upload id, failing the test on error.
func read(t *testing.T, d *Disk, id string) ([]byte, Info) {
	t.Helper()
	f, info, err := d.Open(t.Context(), id)
	if err != nil {
		t.Fatalf("Open(%s): %v", id, err)
	}
	defer f.Close()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatalf("read %s: %v", id, err)
	}
	return b, info
}

// errReader returns its data and then err.
type errReader struct {
	data []byte
	err  error
}

func (r *errReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestDiskPutOpen(t *testing.T) {
	created := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)
	tests := []struct {
		name        string
		data        []byte
		contentType string
	}{
		{"empty", nil, "text/plain"},
		{"text", []byte("hello, world"), "text/plain; charset=utf-8"},
		{"binary 1MiB", randomBytes(t, 1<<20, 1), "image/jpeg"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, dir := newDisk(t)
			d.now = func() time.Time { return created }
			info, err := d.Put(t.Context(), "alice", tt.contentType, bytes.NewReader(tt.data), 1<<20)
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			if !validID(info.ID) {
				t.Errorf("ID %q is not 32 hex digits", info.ID)
			}
			want := Info{ID: info.ID, Size: int64(len(tt.data)), SHA256: sum(tt.data), ContentType: tt.contentType, Created: created, Owner: "alice"}
			if info != want {
				t.Errorf("Put = %+v, want %+v", info, want)
			}
			got, opened := read(t, d, info.ID)
			if !bytes.Equal(got, tt.data) {
				t.Errorf("content differs: got %d bytes, want %d", len(got), len(tt.data))
			}
			if !opened.Created.Equal(created) {
				t.Errorf("Open Created = %v, want %v", opened.Created, created)
			}
			opened.Created = created
			if opened != want {
				t.Errorf("Open Info = %+v, want %+v", opened, want)
			}
			if names := entries(t, dir); !slices.Equal(names, []string{info.ID}) {
				t.Errorf("dir holds %v, want only %s", names, info.ID)
			}
		})
	}
}

func TestDiskPutLimit(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		limit   int64
		wantErr error
	}{
		{"exactly max", 1000, 1000, nil},
		{"max+1", 1001, 1000, ErrTooLarge},
		{"far over max", 100_000, 1000, ErrTooLarge},
		{"empty with max 0", 0, 0, nil},
		{"one byte with max 0", 1, 0, ErrTooLarge},
		{"no overflow at MaxInt64", 10, math.MaxInt64, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, dir := newDisk(t)
			data := randomBytes(t, tt.size, 2)
			// A plain io.Reader, so the store cannot learn the size up front.
			info, err := d.Put(t.Context(), "alice", "a/b", io.MultiReader(bytes.NewReader(data)), tt.limit)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Put error = %v, want %v", err, tt.wantErr)
			}
			names := entries(t, dir)
			if tt.wantErr != nil {
				if len(names) != 0 {
					t.Errorf("a refused upload left %v on disk", names)
				}
				return
			}
			if info.Size != int64(tt.size) || !slices.Equal(names, []string{info.ID}) {
				t.Errorf("size %d, dir %v; want size %d and only %s", info.Size, names, tt.size, info.ID)
			}
		})
	}
	t.Run("negative limit", func(t *testing.T) {
		d, dir := newDisk(t)
		if _, err := d.Put(t.Context(), "alice", "a/b", bytes.NewReader(nil), -1); err == nil {
			t.Error("Put with limit -1 succeeded")
		}
		if names := entries(t, dir); len(names) != 0 {
			t.Errorf("dir holds %v", names)
		}
	})
}

func TestDiskPutFailureLeavesNothing(t *testing.T) {
	errBroken := errors.New("connection reset")
	data := randomBytes(t, 100_000, 3)
	tests := []struct {
		name    string
		reader  func(cancel context.CancelFunc) io.Reader
		wantErr error
	}{
		{
			name:    "reader fails half way",
			reader:  func(context.CancelFunc) io.Reader { return &errReader{data: data, err: errBroken} },
			wantErr: errBroken,
		},
		{
			name: "context cancelled before",
			reader: func(cancel context.CancelFunc) io.Reader {
				cancel()
				return bytes.NewReader(data[:100])
			},
			wantErr: context.Canceled,
		},
		{
			name: "context cancelled while streaming",
			reader: func(cancel context.CancelFunc) io.Reader {
				first := bytes.NewReader(data[:50_000])
				return io.MultiReader(first, readFunc(func(p []byte) (int, error) {
					cancel()
					return copy(p, "more"), nil
				}), bytes.NewReader(data[50_000:]))
			},
			wantErr: context.Canceled,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, dir := newDisk(t)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			_, err := d.Put(ctx, "alice", "a/b", tt.reader(cancel), 1<<20)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Put error = %v, want %v", err, tt.wantErr)
			}
			if names := entries(t, dir); len(names) != 0 {
				t.Errorf("a failed upload left %v on disk", names)
			}
		})
	}
}

// readFunc adapts a function to io.Reader.
type readFunc func(p []byte) (int, error)

func (f readFunc) Read(p []byte) (int, error) { return f(p) }

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

func TestDiskMalformedIDs(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "media")
	d, err := NewDisk(dir)
	if err != nil {
		t.Fatal(err)
	}
	// Targets an escaping id would reach: a file next to dir, and an
	// upload-shaped directory outside it.
	secret := filepath.Join(root, "secret")
	if err := os.WriteFile(secret, []byte("top secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(dir, ".tmp-abc")
	if err := os.Mkdir(leftover, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "../secret", "..", ".", "/", "abc", "deadbeef", "../media/.tmp-abc", ".tmp-abc",
		"0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef0", "0123456789ABCDEF0123456789ABCDEF",
		"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "0123456789abcdef0123456789abcdef"} {
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

func TestDiskDelete(t *testing.T) {
	d, dir := newDisk(t)
	data := []byte("0123456789")
	info := put(t, d, data)
	f, _, err := d.Open(t.Context(), info.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := d.Delete(t.Context(), info.ID); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, _, err := d.Open(t.Context(), info.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Open after Delete = %v, want ErrNotFound", err)
	}
	if err := d.Delete(t.Context(), info.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete = %v, want ErrNotFound", err)
	}
	if names := entries(t, dir); len(names) != 0 {
		t.Errorf("dir holds %v after Delete", names)
	}
	// A reader that opened the file before the delete finishes its download.
	if got, err := io.ReadAll(f); err != nil || !bytes.Equal(got, data) {
		t.Errorf("open file after Delete: %q, %v; want %q", got, err, data)
	}
}

func TestDiskExpire(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	d, dir := newDisk(t)
	ids := make([]string, 3)
	for i := range ids {
		d.now = func() time.Time { return t0.Add(time.Duration(i) * time.Hour) }
		ids[i] = put(t, d, []byte{byte(i)}).ID
	}
	// A deletion that failed half way is finished by the next sweep.
	if err := os.Mkdir(filepath.Join(dir, trashPrefix+"0123456789abcdef0123456789abcdef"), 0o700); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		before      time.Time
		wantDeleted int
		wantKept    []string
	}{
		{t0, 0, ids},                             // strictly before: an upload created at t0 stays
		{t0.Add(time.Hour), 1, ids[1:]},          // the oldest goes
		{t0.Add(time.Hour), 0, ids[1:]},          // nothing more to do
		{t0.Add(90 * time.Minute), 1, ids[2:]},   // the second goes, the newest stays
		{t0.Add(3 * time.Hour), 1, []string{}},   // all gone
		{t0.Add(300 * time.Hour), 0, []string{}}, // empty dir
	}
	for i, s := range steps {
		n, err := d.Expire(t.Context(), s.before)
		if err != nil {
			t.Fatalf("step %d: Expire: %v", i, err)
		}
		if n != s.wantDeleted {
			t.Errorf("step %d: Expire deleted %d, want %d", i, n, s.wantDeleted)
		}
		want := slices.Sorted(slices.Values(s.wantKept))
		if got := entries(t, dir); !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
			t.Errorf("step %d: dir holds %v, want %v", i, got, want)
		}
		for _, id := range ids {
			_, _, err := d.Open(t.Context(), id)
			if kept := slices.Contains(s.wantKept, id); kept != (err == nil) {
				t.Errorf("step %d: Open(%s) = %v, kept %v", i, id, err, kept)
			}
		}
	}
}

func TestDiskExpireCancelled(t *testing.T) {
	d, _ := newDisk(t)
	put(t, d, []byte("x"))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := d.Expire(ctx, time.Now().Add(time.Hour)); !errors.Is(err, context.Canceled) {
		t.Errorf("Expire with a cancelled context = %v, want context.Canceled", err)
	}
}

func TestNewDiskRemovesLeftovers(t *testing.T) {
	d, dir := newDisk(t)
	info := put(t, d, []byte("keep me"))
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
	if got, _ := read(t, d2, info.ID); string(got) != "keep me" {
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

func TestDiskConcurrent(t *testing.T) {
	d, dir := newDisk(t)
	const workers = 16
	var wg sync.WaitGroup
	ids := make([]string, workers)
	errs := make([]error, workers)
	for i := range workers {
		data := randomBytes(t, 64<<10+i, byte(i))
		wg.Go(func() {
			info, err := d.Put(t.Context(), "alice", "a/b", bytes.NewReader(data), 1<<20)
			if err != nil {
				errs[i] = err
				return
			}
			ids[i] = info.ID
			f, got, err := d.Open(t.Context(), info.ID)
			if err != nil {
				errs[i] = err
				return
			}
			b, err := io.ReadAll(f)
			errs[i] = errors.Join(err, f.Close())
			if got.SHA256 != sum(data) || !bytes.Equal(b, data) {
				errs[i] = errors.Join(errs[i], fmt.Errorf("worker %d read back other content", i))
			}
			// Half the workers race a delete against the sweeps below.
			if i%2 == 0 {
				errs[i] = errors.Join(errs[i], d.Delete(t.Context(), info.ID))
			}
		})
	}
	wg.Go(func() {
		for range 20 {
			if _, err := d.Expire(t.Context(), time.Now().Add(-time.Hour)); err != nil {
				t.Errorf("Expire: %v", err)
			}
		}
	})
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	var want []string
	for i, id := range ids {
		if i%2 == 1 {
			want = append(want, id)
		}
	}
	slices.Sort(want)
	if got := entries(t, dir); !slices.Equal(got, want) {
		t.Errorf("dir holds %v, want %v", got, want)
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
	d.now = func() time.Time { return t0 }
	bad := put(t, d, []byte("bad"))
	good := put(t, d, []byte("good"))
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
