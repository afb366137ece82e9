package media

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatd/chatd/broker/service/httpjson"
)

// tokens are the bearer tokens testAuth accepts, and their users.
var tokens = map[string]string{"tok-alice": "alice", "tok-bob": "bob"}

// testAuth authenticates the bearer tokens in tokens.
func testAuth(r *http.Request) (string, error) {
	tok, err := BearerToken(r)
	if err != nil {
		return "", err
	}
	user, ok := tokens[tok]
	if !ok {
		return "", errors.New("invalid token")
	}
	return user, nil
}

// fixture is a Handler over a Disk behind a real HTTP server.
type fixture struct {
	srv  *httptest.Server
	disk *Disk
	dir  string
	h    *Handler
}

// newFixture starts a server whose uploads are limited to maxBytes.
func newFixture(t *testing.T, maxBytes int64) *fixture {
	t.Helper()
	d, dir := newDisk(t)
	return newFixtureWith(t, d, dir, maxBytes)
}

// newFixtureWith starts a server over store.
func newFixtureWith(t *testing.T, store Store, dir string, maxBytes int64) *fixture {
	t.Helper()
	h := &Handler{
		Store:        store,
		Authenticate: testAuth,
		MaxBytes:     maxBytes,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	mux := http.NewServeMux()
	h.Register(mux)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	d, _ := store.(*Disk)
	return &fixture{srv: srv, disk: d, dir: dir, h: h}
}

// do sends a request and returns the response with its body read.
func (f *fixture) do(t *testing.T, method, path, token string, body io.Reader, header http.Header) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, f.srv.URL+path, body)
	if err != nil {
		t.Fatalf("new request: %v", err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := f.srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	return resp, b
}

// upload posts body as alice with contentType (none when empty) and returns
// the response and its decoded success body.
func (f *fixture) upload(t *testing.T, contentType string, body io.Reader) (*http.Response, uploadResponse, []byte) {
	t.Helper()
	h := http.Header{}
	if contentType != "" {
		h.Set("Content-Type", contentType)
	}
	resp, b := f.do(t, http.MethodPost, "/v1/media", "tok-alice", body, h)
	var ur uploadResponse
	if resp.StatusCode == http.StatusCreated {
		if err := json.Unmarshal(b, &ur); err != nil {
			t.Fatalf("decode %s: %v", b, err)
		}
	}
	return resp, ur, b
}

// mustUpload uploads data and fails the test unless it is stored.
func (f *fixture) mustUpload(t *testing.T, data []byte) uploadResponse {
	t.Helper()
	resp, ur, b := f.upload(t, "application/octet-stream", bytes.NewReader(data))
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload: %s %s", resp.Status, b)
	}
	return ur
}

// wantError checks that resp is a JSON error with status and code.
func wantError(t *testing.T, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %s (%s), want %d", resp.Status, body, status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q, want application/json", ct)
	}
	var e httpjson.Error
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("decode error %s: %v", body, err)
	}
	if e.Code != code || e.Reason == "" {
		t.Errorf("error body %+v, want code %q with a reason", e, code)
	}
}

func TestUploadDownload(t *testing.T) {
	f := newFixture(t, 1<<20)
	tests := []struct {
		name        string
		contentType string
		data        []byte
		wantType    string
	}{
		{"text with parameters", "text/plain; charset=utf-8", []byte("hello, bob"), "text/plain; charset=utf-8"},
		{"image", "image/png", randomBytes(t, 200_000, 10), "image/png"},
		{"no content type", "", []byte{0, 1, 2, 3}, "application/octet-stream"},
		{"empty file", "application/pdf", nil, "application/pdf"},
		{"exactly max", "video/mp4", randomBytes(t, 1<<20, 11), "video/mp4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, ur, b := f.upload(t, tt.contentType, bytes.NewReader(tt.data))
			if resp.StatusCode != http.StatusCreated {
				t.Fatalf("upload: %s %s", resp.Status, b)
			}
			if ur.Size != int64(len(tt.data)) || ur.SHA256 != sum(tt.data) || !validID(ur.ID) {
				t.Errorf("upload answered %+v, want size %d sha256 %s", ur, len(tt.data), sum(tt.data))
			}
			if loc := resp.Header.Get("Location"); loc != "/v1/media/"+ur.ID {
				t.Errorf("Location %q", loc)
			}

			// Another authenticated user who knows the id may fetch it.
			resp, got := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-bob", nil, nil)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("download: %s %s", resp.Status, got)
			}
			if !bytes.Equal(got, tt.data) {
				t.Errorf("downloaded %d bytes that differ from the %d uploaded", len(got), len(tt.data))
			}
			if s := sha256.Sum256(got); hex.EncodeToString(s[:]) != ur.SHA256 {
				t.Errorf("downloaded sha256 differs from the announced %s", ur.SHA256)
			}
			wantHeaders := map[string]string{
				"Content-Type":           tt.wantType,
				"Etag":                   `"` + ur.SHA256 + `"`,
				"Accept-Ranges":          "bytes",
				"X-Content-Type-Options": "nosniff",
				"Content-Length":         fmt.Sprint(len(tt.data)),
			}
			for k, v := range wantHeaders {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}

			// The ETag makes revalidation cheap.
			resp, got = f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-bob", nil, http.Header{"If-None-Match": {`"` + ur.SHA256 + `"`}})
			if resp.StatusCode != http.StatusNotModified || len(got) != 0 {
				t.Errorf("If-None-Match: %s with %d bytes, want 304 and none", resp.Status, len(got))
			}
		})
	}
}

func TestDownloadRange(t *testing.T) {
	f := newFixture(t, 1<<20)
	ur := f.mustUpload(t, []byte("0123456789"))
	tests := []struct {
		rangeHdr     string
		wantStatus   int
		wantBody     string
		contentRange string
	}{
		{"bytes=2-5", http.StatusPartialContent, "2345", "bytes 2-5/10"},
		{"bytes=7-", http.StatusPartialContent, "789", "bytes 7-9/10"},
		{"bytes=-3", http.StatusPartialContent, "789", "bytes 7-9/10"},
		{"bytes=0-0", http.StatusPartialContent, "0", "bytes 0-0/10"},
		{"bytes=8-100", http.StatusPartialContent, "89", "bytes 8-9/10"},
		{"bytes=10-20", http.StatusRequestedRangeNotSatisfiable, "", "bytes */10"},
	}
	for _, tt := range tests {
		t.Run(tt.rangeHdr, func(t *testing.T) {
			resp, got := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-alice", nil, http.Header{"Range": {tt.rangeHdr}})
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %s, want %d", resp.Status, tt.wantStatus)
			}
			if cr := resp.Header.Get("Content-Range"); cr != tt.contentRange {
				t.Errorf("Content-Range %q, want %q", cr, tt.contentRange)
			}
			if tt.wantStatus == http.StatusPartialContent && string(got) != tt.wantBody {
				t.Errorf("body %q, want %q", got, tt.wantBody)
			}
		})
	}
}

func TestUploadLimit(t *testing.T) {
	const limit = 4096
	tests := []struct {
		name       string
		size       int
		chunked    bool // the client sends no Content-Length
		wantStatus int
	}{
		{"exactly max", limit, false, http.StatusCreated},
		{"exactly max chunked", limit, true, http.StatusCreated},
		{"max+1", limit + 1, false, http.StatusRequestEntityTooLarge},
		{"max+1 chunked", limit + 1, true, http.StatusRequestEntityTooLarge},
		{"far over max chunked", 8 * limit, true, http.StatusRequestEntityTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, limit)
			data := randomBytes(t, tt.size, 12)
			var body io.Reader = bytes.NewReader(data)
			if tt.chunked {
				body = io.MultiReader(body) // hides the length from net/http
			}
			resp, ur, b := f.upload(t, "", body)
			names := entries(t, f.dir)
			if tt.wantStatus != http.StatusCreated {
				wantError(t, resp, b, tt.wantStatus, "too_large")
				if len(names) != 0 {
					t.Errorf("a refused upload left %v on disk", names)
				}
				return
			}
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %s (%s), want %d", resp.Status, b, tt.wantStatus)
			}
			if ur.Size != int64(tt.size) || !slices.Equal(names, []string{ur.ID}) {
				t.Errorf("answer %+v, dir %v", ur, names)
			}
		})
	}
}

func TestUnauthorized(t *testing.T) {
	f := newFixture(t, 1<<20)
	ur := f.mustUpload(t, []byte("private"))
	before := entries(t, f.dir)
	tests := []struct {
		name string
		auth string // the Authorization header; none when empty
	}{
		{"no header", ""},
		{"unknown token", "Bearer tok-mallory"},
		{"empty bearer", "Bearer "},
		{"basic auth", "Basic YWxpY2U6c2VjcmV0"},
		{"token without scheme", "tok-alice"},
	}
	for _, tt := range tests {
		for _, req := range []struct{ method, path string }{
			{http.MethodPost, "/v1/media"},
			{http.MethodGet, "/v1/media/" + ur.ID},
			{http.MethodGet, "/v1/media/0123456789abcdef0123456789abcdef"},
		} {
			t.Run(tt.name+" "+req.method+" "+req.path, func(t *testing.T) {
				h := http.Header{}
				if tt.auth != "" {
					h.Set("Authorization", tt.auth)
				}
				resp, b := f.do(t, req.method, req.path, "", strings.NewReader("sneaky upload"), h)
				wantError(t, resp, b, http.StatusUnauthorized, "not_authorized")
				if resp.Header.Get("WWW-Authenticate") == "" {
					t.Error("401 without WWW-Authenticate")
				}
				if bytes.Contains(b, []byte("private")) {
					t.Error("401 leaked the file")
				}
			})
		}
	}
	if after := entries(t, f.dir); !slices.Equal(after, before) {
		t.Errorf("unauthenticated requests changed the dir: %v -> %v", before, after)
	}
}

func TestNoAuthenticateFailsClosed(t *testing.T) {
	f := newFixture(t, 1<<20)
	f.h.Authenticate = nil
	resp, b := f.do(t, http.MethodPost, "/v1/media", "tok-alice", strings.NewReader("x"), nil)
	wantError(t, resp, b, http.StatusInternalServerError, "internal")
	if names := entries(t, f.dir); len(names) != 0 {
		t.Errorf("dir holds %v", names)
	}
}

func TestDownloadNotFound(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "media")
	d, err := NewDisk(dir)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixtureWith(t, d, dir, 1<<20)
	// What an escaping id would reach: a file next to the media dir.
	if err := os.WriteFile(filepath.Join(root, "secret"), []byte("top secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	f.mustUpload(t, []byte("an upload that must not be served for a bad id"))
	tests := []struct {
		name     string
		path     string
		wantJSON bool // the request reaches the handler (others are refused by the mux)
	}{
		{"unknown id", "/v1/media/0123456789abcdef0123456789abcdef", true},
		{"escaped traversal", "/v1/media/..%2Fsecret", true},
		{"escaped dot dot", "/v1/media/%2e%2e", false},
		{"traversal", "/v1/media/../secret", false},
		{"empty", "/v1/media/", false},
		{"too short", "/v1/media/abc", true},
		{"too long", "/v1/media/0123456789abcdef0123456789abcdef0", true},
		{"upper case", "/v1/media/0123456789ABCDEF0123456789ABCDEF", true},
		{"not hex", "/v1/media/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", true},
		{"temp dir name", "/v1/media/.tmp-x", true},
		{"absolute", "/v1/media/%2Fetc%2Fpasswd", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, b := f.do(t, http.MethodGet, tt.path, "tok-alice", nil, nil)
			if tt.wantJSON {
				wantError(t, resp, b, http.StatusNotFound, "not_found")
			} else if resp.StatusCode != http.StatusNotFound {
				t.Errorf("status %s, want 404", resp.Status)
			}
			for _, leak := range []string{"top secret", "must not be served", root} {
				if bytes.Contains(b, []byte(leak)) {
					t.Errorf("response leaks %q: %s", leak, b)
				}
			}
		})
	}
}

func TestUploadBadContentType(t *testing.T) {
	f := newFixture(t, 1<<20)
	for _, ct := range []string{"not a media type", "text/plain; charset", "a/" + strings.Repeat("b", maxContentTypeLen)} {
		t.Run(ct[:min(len(ct), 20)], func(t *testing.T) {
			resp, _, b := f.upload(t, ct, strings.NewReader("x"))
			wantError(t, resp, b, http.StatusBadRequest, "bad_request")
		})
	}
	if names := entries(t, f.dir); len(names) != 0 {
		t.Errorf("dir holds %v", names)
	}
}

func TestExpiredNotServed(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	f := newFixture(t, 1<<20)
	f.h.TTL = time.Hour
	f.disk.Now = func() time.Time { return t0 }
	ur := f.mustUpload(t, []byte("short-lived"))
	tests := []struct {
		now        time.Time
		wantStatus int
	}{
		{t0, http.StatusOK},
		{t0.Add(time.Hour - time.Nanosecond), http.StatusOK},
		{t0.Add(time.Hour), http.StatusNotFound},
		{t0.Add(48 * time.Hour), http.StatusNotFound},
	}
	for _, tt := range tests {
		f.h.Now = func() time.Time { return tt.now }
		resp, _ := f.do(t, http.MethodGet, "/v1/media/"+ur.ID, "tok-alice", nil, nil)
		if resp.StatusCode != tt.wantStatus {
			t.Errorf("at %v: status %s, want %d", tt.now, resp.Status, tt.wantStatus)
		}
	}
}

// notifyStore reports the result of every Expire on swept.
type notifyStore struct {
	Store
	swept chan int
}

func (s *notifyStore) Expire(ctx context.Context, before time.Time) (int, error) {
	n, err := s.Store.Expire(ctx, before)
	s.swept <- n
	return n, err
}

func TestRunJanitor(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	d, dir := newDisk(t)
	store := &notifyStore{Store: d, swept: make(chan int, 1)}
	f := newFixtureWith(t, store, dir, 1<<20)
	f.h.TTL = 24 * time.Hour
	f.h.Now = func() time.Time { return t0.Add(25 * time.Hour) }
	d.Now = func() time.Time { return t0 }
	old := f.mustUpload(t, []byte("old"))
	d.Now = func() time.Time { return t0.Add(2 * time.Hour) }
	fresh := f.mustUpload(t, []byte("fresh"))

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.h.RunJanitor(ctx, time.Hour)
	}()
	// The first sweep runs at once.
	select {
	case n := <-store.swept:
		if n != 1 {
			t.Errorf("first sweep deleted %d uploads, want 1", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no sweep at start")
	}
	if _, _, err := d.Open(t.Context(), old.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("expired upload: Open = %v, want ErrNotFound", err)
	}
	if got, _ := readFrom(t, d, fresh.ID); string(got) != "fresh" {
		t.Errorf("fresh upload reads %q", got)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RunJanitor did not return after cancel")
	}
}

func TestRunJanitorStopsWhenCancelled(t *testing.T) {
	d, _ := newDisk(t)
	h := &Handler{Store: d, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	// Returns at once even with a non-positive interval, which a ticker would reject.
	h.RunJanitor(ctx, 0)
}

// failingStore fails every operation with an error naming a file.
type failingStore struct{}

var errDisk = errors.New("open /srv/secret/media/x/data: input/output error")

func (failingStore) Put(context.Context, string, string, io.Reader, int64) (Info, error) {
	return Info{}, errDisk
}

func (failingStore) Open(context.Context, string) (io.ReadSeekCloser, Info, error) {
	return nil, Info{}, errDisk
}

func (failingStore) Delete(context.Context, string) error { return errDisk }

func (failingStore) Expire(context.Context, time.Time) (int, error) { return 0, errDisk }
func (failingStore) Owned(context.Context, string) ([]Info, error)  { return nil, errDisk }

func TestInternalErrorsHidePaths(t *testing.T) {
	f := newFixtureWith(t, failingStore{}, "", 1<<20)
	for _, req := range []struct{ method, path string }{
		{http.MethodPost, "/v1/media"},
		{http.MethodGet, "/v1/media/0123456789abcdef0123456789abcdef"},
	} {
		resp, b := f.do(t, req.method, req.path, "tok-alice", strings.NewReader("x"), nil)
		wantError(t, resp, b, http.StatusInternalServerError, "internal")
		if bytes.Contains(b, []byte("/srv")) || bytes.Contains(b, []byte("input/output")) {
			t.Errorf("%s %s leaks the store error: %s", req.method, req.path, b)
		}
	}
}

func TestUploadStreams(t *testing.T) {
	const size = 32 << 20
	f := newFixture(t, 64<<20)
	want := sha256.New()
	if _, err := io.Copy(want, generator(size, 13)); err != nil {
		t.Fatal(err)
	}
	wantSum := hex.EncodeToString(want.Sum(nil))

	before := allocated()
	resp, ur, b := f.upload(t, "video/mp4", generator(size, 13))
	// Client and server together: holding the upload would allocate at least its size.
	if n := allocated() - before; n > size/4 {
		t.Errorf("a %d-byte upload allocated %d bytes: it is buffered", size, n)
	}
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload: %s %s", resp.Status, b)
	}
	if ur.Size != size || ur.SHA256 != wantSum {
		t.Errorf("upload answered %+v, want size %d sha256 %s", ur, size, wantSum)
	}

	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, f.srv.URL+"/v1/media/"+ur.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer tok-bob")
	dl, err := f.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Body.Close()
	got := sha256.New()
	n, err := io.Copy(got, dl.Body)
	if err != nil || n != size || hex.EncodeToString(got.Sum(nil)) != wantSum {
		t.Errorf("download: %d bytes, %v, sha256 %x; want %d bytes with %s", n, err, got.Sum(nil), size, wantSum)
	}
}

func TestConcurrentUploads(t *testing.T) {
	f := newFixture(t, 1<<20)
	const clients = 16
	datas := make([][]byte, clients)
	for i := range datas {
		datas[i] = randomBytes(t, 100_000+i, byte(20+i))
	}
	ids := make([]string, clients)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, f.srv.URL+"/v1/media", bytes.NewReader(datas[i]))
			if err != nil {
				t.Error(err)
				return
			}
			req.Header.Set("Authorization", "Bearer tok-alice")
			resp, err := f.srv.Client().Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var ur uploadResponse
			if err := json.NewDecoder(resp.Body).Decode(&ur); err != nil || resp.StatusCode != http.StatusCreated {
				t.Errorf("upload %d: %s, %v", i, resp.Status, err)
				return
			}
			if ur.SHA256 != sum(datas[i]) {
				t.Errorf("upload %d: sha256 %s, want %s", i, ur.SHA256, sum(datas[i]))
			}
			ids[i] = ur.ID
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if got := slices.Compact(slices.Sorted(slices.Values(ids))); len(got) != clients {
		t.Fatalf("%d distinct ids for %d uploads", len(got), clients)
	}
	for i, id := range ids {
		resp, got := f.do(t, http.MethodGet, "/v1/media/"+id, "tok-bob", nil, nil)
		if resp.StatusCode != http.StatusOK || !bytes.Equal(got, datas[i]) {
			t.Errorf("upload %d reads back %s with %d bytes, want %d", i, resp.Status, len(got), len(datas[i]))
		}
	}
	if names := entries(t, f.dir); len(names) != clients {
		t.Errorf("dir holds %d entries, want %d: %v", len(names), clients, names)
	}
}

func TestBearerToken(t *testing.T) {
	tests := []struct {
		header string
		want   string
		ok     bool
	}{
		{"Bearer abc.def", "abc.def", true},
		{"bearer abc", "abc", true},
		{"BEARER  abc ", "abc", true},
		{"", "", false},
		{"Bearer", "", false},
		{"Bearer   ", "", false},
		{"Basic abc", "", false},
		{"Bearerabc", "", false},
	}
	for _, tt := range tests {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		if tt.header != "" {
			r.Header.Set("Authorization", tt.header)
		}
		got, err := BearerToken(r)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("BearerToken(%q) = %q, %v; want %q, ok %v", tt.header, got, err, tt.want, tt.ok)
		}
	}
}

func TestUploadBodyError(t *testing.T) {
	d, dir := newDisk(t)
	h := &Handler{Store: d, Authenticate: testAuth, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	mux := http.NewServeMux()
	h.Register(mux)
	// A body that breaks half way, as when the client's connection is cut.
	r := httptest.NewRequest(http.MethodPost, "/v1/media", &errReader{data: randomBytes(t, 10_000, 30), err: io.ErrUnexpectedEOF})
	r.Header.Set("Authorization", "Bearer tok-alice")
	w := httptest.NewRecorder()
	mux.ServeHTTP(w, r)
	resp := w.Result()
	wantError(t, resp, w.Body.Bytes(), http.StatusBadRequest, "bad_request")
	if names := entries(t, dir); len(names) != 0 {
		t.Errorf("a broken upload left %v on disk", names)
	}
}

func TestJanitorLogsFailures(t *testing.T) {
	var logs bytes.Buffer
	h := &Handler{Store: failingStore{}, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	h.sweep(t.Context())
	if out := logs.String(); !strings.Contains(out, "level=ERROR") || !strings.Contains(out, "input/output error") {
		t.Errorf("a failed sweep logged %q, want an error with the cause", out)
	}
}

func TestUploadRefusedWhileDiskLow(t *testing.T) {
	f := newFixture(t, 1<<20)
	var low atomic.Bool
	f.h.DiskLow = low.Load
	low.Store(true)
	resp, _, b := f.upload(t, "image/png", strings.NewReader("picture"))
	wantError(t, resp, b, http.StatusInsufficientStorage, "no_space")
	if names := entries(t, f.dir); len(names) != 0 {
		t.Errorf("a refused upload left %v", names)
	}
	low.Store(false)
	if resp, _, b := f.upload(t, "image/png", strings.NewReader("picture")); resp.StatusCode != http.StatusCreated {
		t.Fatalf("upload once space is back: %d %s", resp.StatusCode, b)
	}
}
