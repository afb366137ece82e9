package media

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"mime"
	"mime/multipart"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/chatd/chatd/broker/cluster/natsnode"
	"github.com/chatd/chatd/broker/cluster/natsnode/natstest"
	"github.com/chatd/chatd/internal/testutil"
)

// The behavioural tests of the Store guarantees run against every
// implementation; the Disk- and Objects-only ones follow them.

// testClock is a clock the tests set and move.
type testClock struct {
	mu   sync.Mutex
	base func() time.Time
	skew time.Duration
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.base().Add(c.skew)
}

// set makes the clock read f() from now on.
func (c *testClock) set(f func() time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.base, c.skew = f, 0
}

// advance moves the clock by d and returns a function that moves it back.
func (c *testClock) advance(d time.Duration) (undo func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.skew += d
	return func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.skew -= d
	}
}

// testStore is one Store implementation under the shared tests.
type testStore struct {
	Store
	clock *testClock
	// contents returns, sorted, the IDs of the complete uploads in storage
	// and a description of anything else there (partial, deleted).
	contents func(t *testing.T) []string
	// settle runs the clean-up an implementation defers (Objects: the
	// chunks of deleted uploads, after the grace period).
	settle func(t *testing.T)
}

// storeKinds are the implementations the shared tests run against.
var storeKinds = []struct {
	name string
	open func(t *testing.T) *testStore
}{
	{"disk", openDiskStore},
	{"objects", openObjectsStore},
}

func openDiskStore(t *testing.T) *testStore {
	d, dir := newDisk(t)
	c := &testClock{base: time.Now}
	d.Now = c.now
	return &testStore{
		Store:    d,
		clock:    c,
		contents: func(t *testing.T) []string { return entries(t, dir) },
		settle:   func(*testing.T) {},
	}
}

func openObjectsStore(t *testing.T) *testStore {
	o, _ := newObjects(t)
	c := &testClock{base: time.Now}
	o.Now = c.now
	return &testStore{
		Store:    o,
		clock:    c,
		contents: func(t *testing.T) []string { return objectsContents(t, o) },
		settle: func(t *testing.T) {
			t.Helper()
			// Two sweeps: a marker of an abandoned upload is retired by
			// one and purged by the next.
			for range 2 {
				undo := c.advance(2 * o.grace)
				_, err := o.Expire(t.Context(), time.Time{})
				undo()
				if err != nil {
					t.Fatalf("settle: Expire: %v", err)
				}
			}
		},
	}
}

// forEachStore runs test as a subtest against every implementation.
func forEachStore(t *testing.T, test func(t *testing.T, s *testStore)) {
	for _, k := range storeKinds {
		t.Run(k.name, func(t *testing.T) { test(t, k.open(t)) })
	}
}

// discardLogger drops everything.
func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startNATS starts an embedded single-node NATS with JetStream, stopped when t ends.
func startNATS(t testing.TB, dir string) *natsnode.Node {
	t.Helper()
	n, err := natsnode.Start(context.Background(), natsnode.Config{Name: "media", Dir: dir, Listen: "127.0.0.1:0", Logger: discardLogger()})
	if err != nil {
		t.Fatalf("start nats: %v", err)
	}
	t.Cleanup(n.Shutdown)
	return n
}

// newObjects returns an Objects on a fresh single-node NATS, R1, and the node.
func newObjects(t testing.TB) (*Objects, *natsnode.Node) {
	t.Helper()
	n := startNATS(t, t.TempDir())
	o, err := NewObjects(t.Context(), n.JetStream(), "media", 1)
	if err != nil {
		t.Fatalf("NewObjects: %v", err)
	}
	return o, n
}

// objectsContents describes what the bucket of o holds: the ID of every
// live upload whose chunks are all there, "<state> <id>" for markers and
// "<n> chunks of <token>" for chunks no live upload names.
func objectsContents(t *testing.T, o *Objects) []string {
	t.Helper()
	ctx := context.Background()
	si, err := o.stream.Info(ctx, jetstream.WithSubjectFilter(">"))
	if err != nil {
		t.Fatalf("stream info: %v", err)
	}
	var out []string
	chunks := map[string]uint64{}
	named := map[string]uint64{}
	for subj, n := range si.State.Subjects {
		if tok, ok := strings.CutPrefix(subj, o.chunkSubject("")); ok {
			chunks[tok] = n
			continue
		}
		enc, ok := strings.CutPrefix(subj, o.metaSubject(""))
		if !ok {
			out = append(out, "stray "+subj)
			continue
		}
		name, err := base64.URLEncoding.DecodeString(enc)
		if err != nil {
			out = append(out, "bad name "+subj)
			continue
		}
		id := string(name)
		_, meta, err := o.lastMeta(ctx, id)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("unreadable %s: %v", id, err))
		case n != 1:
			out = append(out, fmt.Sprintf("%d metadata messages for %s", n, id))
		case meta.Deleted:
			out = append(out, meta.Metadata[mdState]+" "+id)
		default:
			out = append(out, id)
			named[meta.NUID] = uint64(meta.Chunks)
		}
	}
	for tok, n := range chunks {
		if named[tok] != n {
			out = append(out, fmt.Sprintf("%d chunks of %s", n, tok))
		}
		delete(named, tok)
	}
	for tok, n := range named {
		if n != 0 {
			out = append(out, fmt.Sprintf("%d chunks of %s missing", n, tok))
		}
	}
	slices.Sort(out)
	return out
}

// putTo stores data in s for alice, failing the test on error.
func putTo(t *testing.T, s Store, data []byte) Info {
	t.Helper()
	info, err := s.Put(t.Context(), "alice", "application/octet-stream", bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return info
}

// readFrom returns the content and Info of upload id in s, failing the test on error.
func readFrom(t *testing.T, s Store, id string) ([]byte, Info) {
	t.Helper()
	f, info, err := s.Open(t.Context(), id)
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

// readFunc adapts a function to io.Reader.
type readFunc func(p []byte) (int, error)

func (f readFunc) Read(p []byte) (int, error) { return f(p) }

func TestStorePutOpen(t *testing.T) {
	created := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC)
	tests := []struct {
		name        string
		data        []byte
		contentType string
	}{
		{"empty", nil, "text/plain"},
		{"text", []byte("hello, world"), "text/plain; charset=utf-8"},
		{"one chunk exactly", randomBytes(t, chunkSize, 4), ""},
		{"odd size", randomBytes(t, 3*chunkSize+12345, 5), "video/mp4"},
		{"binary 1MiB", randomBytes(t, 1<<20, 1), "image/jpeg"},
	}
	forEachStore(t, func(t *testing.T, s *testStore) {
		s.clock.set(func() time.Time { return created })
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				info, err := s.Put(t.Context(), "alice", tt.contentType, bytes.NewReader(tt.data), 1<<20)
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
				got, opened := readFrom(t, s, info.ID)
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
				if names := s.contents(t); !slices.Contains(names, info.ID) {
					t.Errorf("storage holds %v, not %s", names, info.ID)
				}
			})
		}
		if names := s.contents(t); len(names) != len(tests) {
			t.Errorf("storage holds %v, want %d uploads and nothing else", names, len(tests))
		}
	})
}

func TestStorePutLimit(t *testing.T) {
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
		{"exactly two chunks", 2 * chunkSize, 2 * chunkSize, nil},
		{"one byte past two chunks", 2*chunkSize + 1, 2 * chunkSize, ErrTooLarge},
		{"over max after chunks were stored", 5 * chunkSize, 3*chunkSize + 7, ErrTooLarge},
	}
	forEachStore(t, func(t *testing.T, s *testStore) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				data := randomBytes(t, tt.size, 2)
				// A plain io.Reader, so the store cannot learn the size up front.
				info, err := s.Put(t.Context(), "alice", "a/b", io.MultiReader(bytes.NewReader(data)), tt.limit)
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Put error = %v, want %v", err, tt.wantErr)
				}
				names := s.contents(t)
				if tt.wantErr != nil {
					if len(names) != 0 {
						t.Errorf("a refused upload left %v in storage", names)
					}
					return
				}
				if info.Size != int64(tt.size) || !slices.Equal(names, []string{info.ID}) {
					t.Errorf("size %d, storage %v; want size %d and only %s", info.Size, names, tt.size, info.ID)
				}
				if err := s.Delete(t.Context(), info.ID); err != nil {
					t.Fatal(err)
				}
				s.settle(t)
			})
		}
		t.Run("negative limit", func(t *testing.T) {
			if _, err := s.Put(t.Context(), "alice", "a/b", bytes.NewReader(nil), -1); err == nil {
				t.Error("Put with limit -1 succeeded")
			}
			if names := s.contents(t); len(names) != 0 {
				t.Errorf("storage holds %v", names)
			}
		})
	})
}

func TestStorePutFailureLeavesNothing(t *testing.T) {
	errBroken := errors.New("connection reset")
	data := randomBytes(t, 5*chunkSize+100, 3)
	tests := []struct {
		name    string
		reader  func(cancel context.CancelFunc) io.Reader
		wantErr error
	}{
		{
			name:    "reader fails in the first chunk",
			reader:  func(context.CancelFunc) io.Reader { return &errReader{data: data[:1000], err: errBroken} },
			wantErr: errBroken,
		},
		{
			name:    "reader fails after chunks were stored",
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
				first := bytes.NewReader(data[:3*chunkSize])
				return io.MultiReader(first, readFunc(func(p []byte) (int, error) {
					cancel()
					return copy(p, "more"), nil
				}), bytes.NewReader(data[3*chunkSize:]))
			},
			wantErr: context.Canceled,
		},
		{
			name: "context cancelled after the last byte",
			reader: func(cancel context.CancelFunc) io.Reader {
				return io.MultiReader(bytes.NewReader(data), readFunc(func([]byte) (int, error) {
					cancel()
					return 0, io.EOF
				}))
			},
			wantErr: context.Canceled,
		},
	}
	forEachStore(t, func(t *testing.T, s *testStore) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				ctx, cancel := context.WithCancel(t.Context())
				defer cancel()
				_, err := s.Put(ctx, "alice", "a/b", tt.reader(cancel), 1<<20)
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Put error = %v, want %v", err, tt.wantErr)
				}
				// Without settle: nothing may wait for a later sweep.
				if names := s.contents(t); len(names) != 0 {
					t.Errorf("a failed upload left %v in storage", names)
				}
			})
		}
	})
}

func TestStoreMalformedIDs(t *testing.T) {
	forEachStore(t, func(t *testing.T, s *testStore) {
		kept := putTo(t, s, []byte("keep me"))
		for _, id := range []string{"", "../secret", "..", ".", "/", "abc", "deadbeef", ".tmp-abc", ">", "*",
			"0123456789abcdef0123456789abcde", "0123456789abcdef0123456789abcdef0", "0123456789ABCDEF0123456789ABCDEF",
			"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "0123456789abcdef0123456789abcdef", strings.ToUpper(kept.ID), kept.ID + "\x00",
			"0123456789abcdef.123456789abcdef", "0123456789abcdef 123456789abcdef"} {
			t.Run(fmt.Sprintf("%q", id), func(t *testing.T) {
				if f, _, err := s.Open(t.Context(), id); !errors.Is(err, ErrNotFound) {
					if f != nil {
						f.Close()
					}
					t.Errorf("Open = %v, want ErrNotFound", err)
				}
				if err := s.Delete(t.Context(), id); !errors.Is(err, ErrNotFound) {
					t.Errorf("Delete = %v, want ErrNotFound", err)
				}
			})
		}
		if got, _ := readFrom(t, s, kept.ID); string(got) != "keep me" {
			t.Errorf("upload reads %q", got)
		}
	})
}

func TestStoreDelete(t *testing.T) {
	data := randomBytes(t, 3*chunkSize+10, 9)
	forEachStore(t, func(t *testing.T, s *testStore) {
		info := putTo(t, s, data)
		other := putTo(t, s, []byte("other"))
		f, _, err := s.Open(t.Context(), info.ID)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		// A download under way when the delete comes.
		head := make([]byte, chunkSize+5)
		if _, err := io.ReadFull(f, head); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(t.Context(), info.ID); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if _, _, err := s.Open(t.Context(), info.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("Open after Delete = %v, want ErrNotFound", err)
		}
		if err := s.Delete(t.Context(), info.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("second Delete = %v, want ErrNotFound", err)
		}
		// The file opened before the delete finishes its download, and can seek.
		rest, err := io.ReadAll(f)
		if err != nil || !bytes.Equal(append(head, rest...), data) {
			t.Errorf("open file after Delete: %d bytes, %v; want %d", len(head)+len(rest), err, len(data))
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		if again, err := io.ReadAll(f); err != nil || !bytes.Equal(again, data) {
			t.Errorf("open file after Delete, read again: %d bytes, %v", len(again), err)
		}
		s.settle(t)
		if names := s.contents(t); !slices.Equal(names, []string{other.ID}) {
			t.Errorf("storage holds %v after Delete, want only %s", names, other.ID)
		}
	})
}

func TestStoreExpire(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	forEachStore(t, func(t *testing.T, s *testStore) {
		ids := make([]string, 3)
		for i := range ids {
			s.clock.set(func() time.Time { return t0.Add(time.Duration(i) * time.Hour) })
			ids[i] = putTo(t, s, randomBytes(t, i*chunkSize+1, byte(i))).ID
		}
		s.clock.set(time.Now)
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
			{t0.Add(300 * time.Hour), 0, []string{}}, // empty
		}
		for i, st := range steps {
			n, err := s.Expire(t.Context(), st.before)
			if err != nil {
				t.Fatalf("step %d: Expire: %v", i, err)
			}
			if n != st.wantDeleted {
				t.Errorf("step %d: Expire deleted %d, want %d", i, n, st.wantDeleted)
			}
			for _, id := range ids {
				_, _, err := s.Open(t.Context(), id)
				if kept := slices.Contains(st.wantKept, id); kept != (err == nil) {
					t.Errorf("step %d: Open(%s) = %v, kept %v", i, id, err, kept)
				}
			}
			s.settle(t)
			want := slices.Sorted(slices.Values(st.wantKept))
			if got := s.contents(t); !slices.Equal(got, want) {
				t.Errorf("step %d: storage holds %v, want %v", i, got, want)
			}
		}
	})
}

// TestStoreExpireMany expires more uploads than one batch of a sweep holds.
func TestStoreExpireMany(t *testing.T) {
	const uploads = 2*listBatch + 50
	forEachStore(t, func(t *testing.T, s *testStore) {
		var keep []string
		for i := range uploads {
			info := putTo(t, s, []byte{byte(i)})
			if i%100 == 0 {
				// Created later than the others: stays.
				if err := s.Delete(t.Context(), info.ID); err != nil {
					t.Fatal(err)
				}
				undo := s.clock.advance(time.Hour)
				keep = append(keep, putTo(t, s, []byte("new")).ID)
				undo()
			}
		}
		n, err := s.Expire(t.Context(), time.Now().Add(time.Minute))
		if err != nil || n != uploads-len(keep) {
			t.Errorf("Expire = %d, %v; want %d", n, err, uploads-len(keep))
		}
		s.settle(t)
		if got := s.contents(t); !slices.Equal(got, slices.Sorted(slices.Values(keep))) {
			t.Errorf("storage holds %d entries, want the %d kept", len(got), len(keep))
		}
	})
}

func TestStoreExpireCancelled(t *testing.T) {
	forEachStore(t, func(t *testing.T, s *testStore) {
		putTo(t, s, []byte("x"))
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if _, err := s.Expire(ctx, time.Now().Add(time.Hour)); !errors.Is(err, context.Canceled) {
			t.Errorf("Expire with a cancelled context = %v, want context.Canceled", err)
		}
	})
}

func TestStoreConcurrent(t *testing.T) {
	forEachStore(t, func(t *testing.T, s *testStore) {
		const workers = 16
		var wg sync.WaitGroup
		ids := make([]string, workers)
		errs := make([]error, workers)
		for i := range workers {
			data := randomBytes(t, 3*chunkSize/2+i, byte(i))
			wg.Go(func() {
				info, err := s.Put(t.Context(), "alice", "a/b", bytes.NewReader(data), 1<<20)
				if err != nil {
					errs[i] = err
					return
				}
				ids[i] = info.ID
				f, got, err := s.Open(t.Context(), info.ID)
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
					errs[i] = errors.Join(errs[i], s.Delete(t.Context(), info.ID))
				}
			})
		}
		wg.Go(func() {
			for range 20 {
				if _, err := s.Expire(t.Context(), time.Now().Add(-time.Hour)); err != nil {
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
		s.settle(t)
		if got := s.contents(t); !slices.Equal(got, want) {
			t.Errorf("storage holds %v, want %v", got, want)
		}
	})
}

// TestStoreSeek checks the file Open returns against bytes.Reader over
// the same content, with random seeks and reads across chunk boundaries.
func TestStoreSeek(t *testing.T) {
	data := randomBytes(t, 4*chunkSize+777, 11)
	forEachStore(t, func(t *testing.T, s *testStore) {
		info := putTo(t, s, data)
		f, _, err := s.Open(t.Context(), info.ID)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		want := bytes.NewReader(data)
		rng := rand.New(rand.NewPCG(1, 2))
		size := int64(len(data))
		for i := range 120 {
			var off int64
			whence := rng.IntN(3)
			switch whence {
			case io.SeekStart:
				off = rng.Int64N(size + 10)
			case io.SeekCurrent:
				off = rng.Int64N(2*chunkSize) - chunkSize
			case io.SeekEnd:
				off = -rng.Int64N(size + 1)
			}
			gotPos, gotErr := f.Seek(off, whence)
			wantPos, wantErr := want.Seek(off, whence)
			if (gotErr != nil) != (wantErr != nil) || (gotErr == nil && gotPos != wantPos) {
				t.Fatalf("op %d: Seek(%d, %d) = %d, %v; want %d, %v", i, off, whence, gotPos, gotErr, wantPos, wantErr)
			}
			n := rng.IntN(chunkSize + chunkSize/2)
			got, gotErr := io.ReadAll(io.LimitReader(f, int64(n)))
			exp, _ := io.ReadAll(io.LimitReader(want, int64(n)))
			if gotErr != nil || !bytes.Equal(got, exp) {
				t.Fatalf("op %d: read %d at %d: %d bytes, %v; want %d bytes", i, n, wantPos, len(got), gotErr, len(exp))
			}
		}
		if _, err := f.Seek(-1, io.SeekStart); err == nil {
			t.Error("Seek to -1 succeeded")
		}
		if pos, err := f.Seek(0, io.SeekEnd); err != nil || pos != size {
			t.Errorf("Seek(0, SeekEnd) = %d, %v; want %d", pos, err, size)
		}
		if n, err := f.Read(make([]byte, 10)); n != 0 || err != io.EOF {
			t.Errorf("Read at end = %d, %v; want 0, EOF", n, err)
		}
	})
}

// TestStoreHTTP serves uploads through Handler, whose GET uses
// http.ServeContent: whole files, ranges and multipart ranges, which seek
// back and forth.
func TestStoreHTTP(t *testing.T) {
	data := randomBytes(t, 3*chunkSize+5000, 12)
	forEachStore(t, func(t *testing.T, s *testStore) {
		f := newFixtureWith(t, s.Store, "", 1<<20)
		ur := f.mustUpload(t, data)
		if ur.Size != int64(len(data)) || ur.SHA256 != sum(data) {
			t.Fatalf("upload answered %+v", ur)
		}
		resp, got := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-bob", nil, nil)
		if resp.StatusCode != http.StatusOK || !bytes.Equal(got, data) {
			t.Fatalf("GET: %s, %d bytes; want 200 and %d bytes", resp.Status, len(got), len(data))
		}
		ranges := []struct{ hdr, body string }{
			{"bytes=200000-300000", string(data[200000:300001])},
			{"bytes=-1000", string(data[len(data)-1000:])},
			{fmt.Sprintf("bytes=%d-%d", chunkSize-1, chunkSize), string(data[chunkSize-1 : chunkSize+1])},
		}
		for _, r := range ranges {
			resp, got := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-bob", nil, http.Header{"Range": {r.hdr}})
			if resp.StatusCode != http.StatusPartialContent || string(got) != r.body {
				t.Errorf("Range %s: %s, %d bytes; want 206 and %d bytes", r.hdr, resp.Status, len(got), len(r.body))
			}
		}
		// Later range first: ServeContent seeks forward, then back.
		resp, got = f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-bob", nil, http.Header{"Range": {"bytes=300000-300009,0-9"}})
		if resp.StatusCode != http.StatusPartialContent {
			t.Fatalf("multipart range: %s", resp.Status)
		}
		_, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
		if err != nil {
			t.Fatal(err)
		}
		mr := multipart.NewReader(bytes.NewReader(got), params["boundary"])
		for _, want := range [][]byte{data[300000:300010], data[:10]} {
			p, err := mr.NextPart()
			if err != nil {
				t.Fatalf("multipart: %v", err)
			}
			b, err := io.ReadAll(p)
			if err != nil || !bytes.Equal(b, want) {
				t.Errorf("part %s: %q, %v; want %q", p.Header.Get("Content-Range"), b, err, want)
			}
		}
	})
}

func TestNewObjectsErrors(t *testing.T) {
	_, n := newObjects(t)
	js := n.JetStream()
	tests := []struct {
		name     string
		js       jetstream.JetStream
		bucket   string
		replicas int
	}{
		{"no jetstream", nil, "media", 1},
		{"empty bucket", js, "", 1},
		{"dot in bucket", js, "a.b", 1},
		{"wildcard bucket", js, "a*", 1},
		{"zero replicas", js, "media", 0},
		{"six replicas", js, "media", 6},
		{"more replicas than servers", js, "other", 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewObjects(t.Context(), tt.js, tt.bucket, tt.replicas); err == nil {
				t.Error("NewObjects succeeded")
			}
		})
	}
}

// TestObjectsReopen checks that uploads outlive their Objects and their
// NATS server, and that jetstream's own object store reads them.
func TestObjectsReopen(t *testing.T) {
	dir := t.TempDir()
	n := startNATS(t, dir)
	o, err := NewObjects(t.Context(), n.JetStream(), "media", 1)
	if err != nil {
		t.Fatal(err)
	}
	data := randomBytes(t, 2*chunkSize+3, 13)
	info := putTo(t, o, data)
	gone := putTo(t, o, []byte("deleted"))
	if err := o.Delete(t.Context(), gone.ID); err != nil {
		t.Fatal(err)
	}
	n.Shutdown()

	n = startNATS(t, dir)
	// A second node of the cluster opening the same bucket, over its own connection.
	other, err := natsnode.Start(t.Context(), natsnode.Config{URL: n.ClientURL(), Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Shutdown()
	for _, js := range []jetstream.JetStream{n.JetStream(), other.JetStream()} {
		o, err := NewObjects(t.Context(), js, "media", 1)
		if err != nil {
			t.Fatal(err)
		}
		got, opened := readFrom(t, o, info.ID)
		if !bytes.Equal(got, data) || opened.SHA256 != info.SHA256 || !opened.Created.Equal(info.Created) {
			t.Errorf("after restart: %d bytes, %+v; want %d bytes, %+v", len(got), opened, len(data), info)
		}
		if _, _, err := o.Open(t.Context(), gone.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("deleted upload after restart: Open = %v, want ErrNotFound", err)
		}
	}

	obs, err := n.JetStream().ObjectStore(t.Context(), "media")
	if err != nil {
		t.Fatal(err)
	}
	got, err := obs.GetBytes(t.Context(), info.ID)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("jetstream ObjectStore.GetBytes: %d bytes, %v; want %d bytes", len(got), err, len(data))
	}
	if _, err := obs.GetInfo(t.Context(), gone.ID); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Errorf("jetstream ObjectStore.GetInfo of deleted upload: %v, want ErrObjectNotFound", err)
	}
}

// TestObjectsMalformedIDsNoStorageAccess checks that a malformed ID is
// refused before JetStream is asked: with the connection gone it is still
// ErrNotFound, while a well-formed one fails on the connection.
func TestObjectsMalformedIDsNoStorageAccess(t *testing.T) {
	o, n := newObjects(t)
	n.Shutdown()
	for _, id := range []string{"", "../x", ">", "0123456789ABCDEF0123456789ABCDEF"} {
		if _, _, err := o.Open(t.Context(), id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Open(%q) = %v, want ErrNotFound", id, err)
		}
		if err := o.Delete(t.Context(), id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Delete(%q) = %v, want ErrNotFound", id, err)
		}
	}
	id := "0123456789abcdef0123456789abcdef"
	if _, _, err := o.Open(t.Context(), id); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Open(%q) without a connection = %v, want a storage error", id, err)
	}
	if err := o.Delete(t.Context(), id); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Delete(%q) without a connection = %v, want a storage error", id, err)
	}
}

// TestObjectsDeleteGrace checks that the chunks of a deleted upload stay
// for the grace period, for downloads already open, and go after it.
func TestObjectsDeleteGrace(t *testing.T) {
	o, _ := newObjects(t)
	c := &testClock{base: time.Now}
	o.Now = c.now
	data := randomBytes(t, 2*chunkSize+1, 14)
	info := putTo(t, o, data)
	f, _, err := o.Open(t.Context(), info.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := o.Delete(t.Context(), info.ID); err != nil {
		t.Fatal(err)
	}
	c.advance(o.grace - time.Minute)
	if _, err := o.Expire(t.Context(), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if got := objectsContents(t, o); !slices.Equal(got, []string{"3 chunks of " + tokenOf(t, o, info.ID), "deleted " + info.ID}) {
		t.Errorf("within the grace period the bucket holds %v", got)
	}
	if got, err := io.ReadAll(f); err != nil || !bytes.Equal(got, data) {
		t.Errorf("download within the grace period: %d bytes, %v", len(got), err)
	}
	c.advance(2 * time.Minute)
	if _, err := o.Expire(t.Context(), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if got := objectsContents(t, o); len(got) != 0 {
		t.Errorf("after the grace period the bucket holds %v", got)
	}
	// A download outliving the grace period fails rather than ends short.
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(f); err == nil {
		t.Error("reading purged chunks succeeded")
	}
}

// tokenOf returns the chunk token the metadata of id names.
func tokenOf(t *testing.T, o *Objects, id string) string {
	t.Helper()
	_, meta, err := o.lastMeta(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return meta.NUID
}

// TestObjectsCrashedUpload checks that the chunks of a Put that never
// committed (its node crashed) are found and purged by Expire.
func TestObjectsCrashedUpload(t *testing.T) {
	o, _ := newObjects(t)
	c := &testClock{base: time.Now}
	o.Now = c.now
	id, token := "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
	u := &upload{o: o, id: id, token: token}
	for range 2 {
		if _, err := u.chunk(t.Context(), []byte("chunk")); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"2 chunks of " + token, "uploading " + id}
	if got := objectsContents(t, o); !slices.Equal(got, want) {
		t.Fatalf("bucket holds %v, want %v", got, want)
	}
	if _, _, err := o.Open(t.Context(), id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Open of an uncommitted upload = %v, want ErrNotFound", err)
	}
	if err := o.Delete(t.Context(), id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete of an uncommitted upload = %v, want ErrNotFound", err)
	}
	steps := []struct {
		advance time.Duration
		want    []string
	}{
		{0, want}, // may still be going
		{2 * o.grace, []string{"2 chunks of " + token, "deleted " + id}}, // taken for abandoned
		{o.grace / 2, []string{"2 chunks of " + token, "deleted " + id}}, // any late chunk may still land
		{o.grace, nil}, // purged
	}
	for i, s := range steps {
		c.advance(s.advance)
		n, err := o.Expire(t.Context(), time.Now().Add(time.Hour))
		if n != 0 || err != nil {
			t.Errorf("step %d: Expire = %d, %v; want 0, nil", i, n, err)
		}
		if got := objectsContents(t, o); !slices.Equal(got, s.want) {
			t.Errorf("step %d: bucket holds %v, want %v", i, got, s.want)
		}
	}
}

// gateReader gives data, stopping once after stop bytes until released.
type gateReader struct {
	data    []byte
	stop    int
	read    int
	stopped chan struct{} // closed when the reader waits
	release chan struct{} // closed by the test
}

func newGateReader(data []byte, stop int) *gateReader {
	return &gateReader{data: data, stop: stop, stopped: make(chan struct{}), release: make(chan struct{})}
}

func (g *gateReader) Read(p []byte) (int, error) {
	if g.read == g.stop {
		select {
		case <-g.stopped:
		default:
			close(g.stopped)
			<-g.release
		}
	}
	if g.read == len(g.data) {
		return 0, io.EOF
	}
	end := len(g.data)
	if g.read < g.stop {
		end = g.stop
	}
	n := copy(p, g.data[g.read:end])
	g.read += n
	return n, nil
}

// TestObjectsSlowUpload checks that Expire leaves alone an upload whose
// chunks keep coming, however long ago it began, and that one it took for
// abandoned can no longer commit.
func TestObjectsSlowUpload(t *testing.T) {
	data := randomBytes(t, 3*chunkSize, 15)
	for _, abandoned := range []bool{false, true} {
		t.Run(fmt.Sprintf("abandoned=%v", abandoned), func(t *testing.T) {
			o, _ := newObjects(t)
			c := &testClock{base: func() time.Time { return time.Now().Add(-2 * o.grace) }}
			o.Now = c.now
			g := newGateReader(data, 2*chunkSize)
			type result struct {
				info Info
				err  error
			}
			done := make(chan result, 1)
			go func() {
				info, err := o.Put(context.Background(), "alice", "a/b", g, 1<<20)
				done <- result{info, err}
			}()
			<-g.stopped // two chunks stored, under a marker stamped 2 grace periods ago
			if abandoned {
				c.set(func() time.Time { return time.Now().Add(2 * o.grace) })
			} else {
				c.set(time.Now)
			}
			if _, err := o.Expire(t.Context(), time.Time{}); err != nil {
				t.Fatal(err)
			}
			close(g.release)
			r := <-done
			if !abandoned {
				if r.err != nil {
					t.Fatalf("Put: %v", r.err)
				}
				if got, _ := readFrom(t, o, r.info.ID); !bytes.Equal(got, data) {
					t.Errorf("slow upload reads %d bytes, want %d", len(got), len(data))
				}
				return
			}
			if r.err == nil {
				t.Fatal("Put of an upload Expire retired succeeded")
			}
			if got := objectsContents(t, o); len(got) != 0 {
				t.Errorf("a retired upload left %v", got)
			}
		})
	}
}

func TestObjectsCorruptMetadata(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	o, _ := newObjects(t)
	o.Now = func() time.Time { return t0 }
	bad := putTo(t, o, []byte("bad"))
	good := putTo(t, o, []byte("good"))
	if _, err := o.js.Publish(t.Context(), o.metaSubject(bad.ID), []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := o.Open(t.Context(), bad.ID); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("Open of corrupt upload = %v, want an error other than ErrNotFound", err)
	}
	// One broken upload neither stops the sweep nor goes unreported.
	n, err := o.Expire(t.Context(), t0.Add(time.Hour))
	if n != 1 || err == nil {
		t.Errorf("Expire = %d, %v; want 1 and an error", n, err)
	}
	if _, _, err := o.Open(t.Context(), good.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("expired upload: Open = %v, want ErrNotFound", err)
	}
}

// TestObjectsPutStreams checks that Put stores chunks as it reads: the
// stream holds all but the last couple of chunks read so far at any time.
func TestObjectsPutStreams(t *testing.T) {
	const size = 16 << 20
	o, _ := newObjects(t)
	var (
		read   int64
		checks int
		fail   error
	)
	src := generator(size, 7)
	r := readFunc(func(p []byte) (int, error) {
		if read%(1<<20) == 0 && read > 0 && fail == nil {
			si, err := o.stream.Info(context.Background())
			if err != nil {
				fail = err
			} else if int64(si.State.Bytes) < read-2*chunkSize {
				fail = fmt.Errorf("after reading %d bytes the stream holds %d: the upload is buffered", read, si.State.Bytes)
			}
			checks++
		}
		n, err := src.Read(p)
		read += int64(n)
		return n, err
	})
	info, err := o.Put(t.Context(), "alice", "video/mp4", r, size)
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	if fail != nil || checks < 10 {
		t.Errorf("%d checks: %v", checks, fail)
	}
	if info.Size != size {
		t.Errorf("size %d, want %d", info.Size, size)
	}
}

// TestObjectsCluster checks an R3 bucket on three nodes: an upload stored
// through one node is found at once through the others, and outlives the
// node it was stored through.
func TestObjectsCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a three-node cluster")
	}
	nodes := natstest.Cluster(t, 3)
	stores := make([]*Objects, len(nodes))
	for i, n := range nodes {
		o, err := NewObjects(t.Context(), n.JetStream(), "media", 3)
		if err != nil {
			t.Fatalf("node %d: NewObjects: %v", i, err)
		}
		stores[i] = o
	}
	data := randomBytes(t, 2*chunkSize+99, 16)
	for i, o := range stores {
		info := putTo(t, o, data)
		for j, other := range stores {
			if got, _ := readFrom(t, other, info.ID); !bytes.Equal(got, data) {
				t.Errorf("stored through %d, read through %d: %d bytes", i, j, len(got))
			}
		}
		if err := stores[(i+1)%3].Delete(t.Context(), info.ID); err != nil {
			t.Fatal(err)
		}
		for j, other := range stores {
			if _, _, err := other.Open(t.Context(), info.ID); !errors.Is(err, ErrNotFound) {
				t.Errorf("deleted, then opened through %d: %v", j, err)
			}
		}
	}
	kept := putTo(t, stores[0], data)
	nodes[0].Shutdown()
	for j, other := range stores[1:] {
		// The stream may need a new leader: retry until it answers.
		if err := testutil.Poll(30*time.Second, func() error { return readsBack(t, other, kept.ID, data) }); err != nil {
			t.Errorf("node %d after node 0 stopped: %v", j+1, err)
		}
	}
}

// readsBack reads upload id of s with a short timeout and compares it with want.
func readsBack(t *testing.T, s Store, id string, want []byte) error {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	f, _, err := s.Open(ctx, id)
	if err != nil {
		return err
	}
	defer f.Close()
	got, err := io.ReadAll(f)
	if err == nil && !bytes.Equal(got, want) {
		err = fmt.Errorf("read %d bytes, want %d", len(got), len(want))
	}
	return err
}

func TestSeqRuns(t *testing.T) {
	var s seqRuns
	seqs := []uint64{5, 6, 7, 9, 10, 20, 21, 22, 23, 100}
	for _, q := range seqs {
		s.add(q)
	}
	if got := s.String(); got != "5+3,9+2,20+4,100+1" {
		t.Errorf("String = %q", got)
	}
	p, err := parseSeqRuns(s.String())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []seqRuns{s, p} {
		if r.count() != uint64(len(seqs)) {
			t.Fatalf("count %d, want %d", r.count(), len(seqs))
		}
		for i, q := range seqs {
			if got := r.at(uint64(i)); got != q {
				t.Errorf("at(%d) = %d, want %d", i, got, q)
			}
		}
	}
	if e, err := parseSeqRuns(""); err != nil || e.count() != 0 {
		t.Errorf(`parseSeqRuns("") = %v, %v`, e, err)
	}
	for _, bad := range []string{"x", "1", "1+", "+1", "0+1", "1+0", "1+2,", "-1+2", "18446744073709551615+2", "1+4294967296"} {
		if _, err := parseSeqRuns(bad); err == nil {
			t.Errorf("parseSeqRuns(%q) succeeded", bad)
		}
	}
}

func BenchmarkObjectsPut(b *testing.B) {
	o, _ := newObjects(b)
	data := randomBytes(b, 1<<20, 8)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := o.Put(b.Context(), "bench", "application/octet-stream", bytes.NewReader(data), int64(len(data))); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkObjectsRead(b *testing.B) {
	o, _ := newObjects(b)
	data := randomBytes(b, 1<<20, 8)
	info, err := o.Put(b.Context(), "bench", "application/octet-stream", bytes.NewReader(data), int64(len(data)))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		f, _, err := o.Open(b.Context(), info.ID)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, f); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// TestStoreOwned: Owned lists an owner's live uploads, oldest first, and
// no one else's, nor a deleted one.
func TestStoreOwned(t *testing.T) {
	forEachStore(t, func(t *testing.T, s *testStore) {
		put := func(owner string) Info {
			t.Helper()
			info, err := s.Put(t.Context(), owner, "text/plain", strings.NewReader(owner), 100)
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			// The clock stays moved: each upload is a second younger.
			s.clock.advance(time.Second)
			return info
		}
		a1, _, a2, gone := put("alice"), put("bob"), put("alice"), put("alice")
		if err := s.Delete(t.Context(), gone.ID); err != nil {
			t.Fatal(err)
		}
		got, err := s.Owned(t.Context(), "alice")
		if err != nil {
			t.Fatalf("Owned: %v", err)
		}
		var ids []string
		for _, i := range got {
			ids = append(ids, i.ID)
			if i.Owner != "alice" || i.Size != 5 || i.ContentType != "text/plain" {
				t.Errorf("listed %+v", i)
			}
		}
		if !slices.Equal(ids, []string{a1.ID, a2.ID}) {
			t.Fatalf("Owned(alice) = %v, want %v and %v, oldest first", ids, a1.ID, a2.ID)
		}
		if got, err := s.Owned(t.Context(), "carol"); err != nil || len(got) != 0 {
			t.Fatalf("Owned(carol) = %v, %v; want none", got, err)
		}
	})
}
