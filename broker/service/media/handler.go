package media

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/service/httpjson"
)

// DefaultMaxBytes is the upload limit when Handler.MaxBytes is not set (PROTOCOL.md: 64 MiB).
const DefaultMaxBytes int64 = 64 << 20

// DefaultTTL is how long uploads live when Handler.TTL is not set (PROTOCOL.md: 30 days).
const DefaultTTL = 30 * 24 * time.Hour

// DefaultJanitorEvery is the sweep interval RunJanitor uses for a non-positive one.
const DefaultJanitorEvery = time.Hour

// maxContentTypeLen bounds the stored Content-Type; real media types are far shorter.
const maxContentTypeLen = 256

// defaultContentType is stored for an upload that names no type.
const defaultContentType = "application/octet-stream"

// Handler serves POST /v1/media and GET /v1/media/{id} of PROTOCOL.md section 7.
// Set Store and Authenticate; the zero value of the other fields is the default.
type Handler struct {
	// Store keeps the files.
	Store Store
	// Authenticate returns the user a request is made by, or an error when
	// its credentials are missing or invalid; the error's text is sent to
	// the client as the reason of the 401. Nil answers every request with 500.
	Authenticate func(r *http.Request) (user string, err error)
	// MaxBytes is the largest upload; 0 or less means DefaultMaxBytes.
	MaxBytes int64
	// TTL is how long an upload is served and kept; 0 or less means DefaultTTL.
	TTL time.Duration
	// Logger receives errors and expiry counts; nil means slog.Default().
	Logger *slog.Logger
	// DiskLow reports that the disk is too full to take uploads; nil means never.
	DiskLow func() bool
	// Now is the clock uploads expire by; nil means time.Now.
	Now func() time.Time
}

// uploadResponse is the body of a successful POST /v1/media.
type uploadResponse struct {
	ID     string `json:"id"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Register adds the media routes to mux.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/media", h.upload)
	mux.HandleFunc("GET /v1/media/{id}", h.download)
}

// RunJanitor deletes the uploads older than TTL, first at once and then
// every interval (DefaultJanitorEvery when not positive), logging failures,
// until ctx is done. It blocks: the caller runs it in a goroutine it owns, and
// cancels ctx and waits for RunJanitor to return before closing the Store.
func (h *Handler) RunJanitor(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultJanitorEvery
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		h.sweep(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweep runs one expiry pass.
func (h *Handler) sweep(ctx context.Context) {
	n, err := h.Store.Expire(ctx, h.clock().Add(-h.ttl()))
	switch {
	case err != nil && ctx.Err() != nil:
		h.log().Debug("media expiry interrupted by shutdown", "deleted", n, "error", err)
	case err != nil:
		h.log().Error("media expiry", "deleted", n, "error", err)
	case n > 0:
		h.log().Info("media expired", "deleted", n)
	}
}

// upload serves POST /v1/media.
func (h *Handler) upload(w http.ResponseWriter, r *http.Request) {
	user, ok := h.authenticate(w, r)
	if !ok {
		return
	}
	ct, err := contentType(r.Header.Get("Content-Type"))
	if err != nil {
		httpjson.Fail(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if h.DiskLow != nil && h.DiskLow() {
		httpjson.Fail(w, http.StatusInsufficientStorage, "no_space", "the server's disk is full; try again later")
		return
	}
	limit := h.maxBytes()
	if r.ContentLength > limit {
		h.tooLarge(w, limit)
		return
	}
	// MaxBytesReader also makes the server close the connection instead of
	// draining the rest of an oversized body.
	body := &bodyReader{r: http.MaxBytesReader(w, r.Body, limit)}
	info, err := h.Store.Put(r.Context(), user, ct, body, limit)
	var mbe *http.MaxBytesError
	switch {
	case err == nil:
	case errors.Is(err, ErrTooLarge) || errors.As(body.err, &mbe):
		h.tooLarge(w, limit)
		return
	case body.err != nil || r.Context().Err() != nil:
		// The client's side failed (connection cut, bad chunking): nothing
		// for the operator to act on.
		h.log().Debug("media upload aborted", "user", user, "error", err)
		httpjson.Fail(w, http.StatusBadRequest, "bad_request", "reading the request body failed")
		return
	default:
		h.log().Error("media upload", "user", user, "error", err)
		httpjson.Fail(w, http.StatusInternalServerError, "internal", "the upload could not be stored")
		return
	}
	h.log().Debug("media uploaded", "user", user, "id", info.ID, "size", info.Size)
	w.Header().Set("Location", "/v1/media/"+info.ID)
	httpjson.Write(w, http.StatusCreated, uploadResponse{ID: info.ID, Size: info.Size, SHA256: info.SHA256})
}

// download serves GET (and HEAD) /v1/media/{id}.
func (h *Handler) download(w http.ResponseWriter, r *http.Request) {
	if _, ok := h.authenticate(w, r); !ok {
		return
	}
	f, info, err := h.Store.Open(r.Context(), r.PathValue("id"))
	if errors.Is(err, ErrNotFound) {
		h.notFound(w)
		return
	}
	if err != nil {
		if r.Context().Err() != nil {
			h.log().Debug("media download aborted", "error", err)
		} else {
			h.log().Error("media download", "error", err)
		}
		httpjson.Fail(w, http.StatusInternalServerError, "internal", "the file could not be read")
		return
	}
	defer func() {
		if err := f.Close(); err != nil {
			h.log().Warn("media download: close", "id", info.ID, "error", err)
		}
	}()
	// Between janitor runs an expired upload is still on disk; it is gone
	// for clients the moment its TTL is over.
	if !h.clock().Before(info.Created.Add(h.ttl())) {
		h.notFound(w)
		return
	}
	hdr := w.Header()
	hdr.Set("Content-Type", info.ContentType)
	hdr.Set("ETag", `"`+info.SHA256+`"`)
	// Uploads are arbitrary user content served from the API's origin: an
	// uploaded text/html must neither be sniffed nor run script.
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Content-Security-Policy", "sandbox")
	http.ServeContent(w, r, "", info.Created, f)
}

// authenticate answers 401 (or 500 when unconfigured) and returns false
// unless r carries valid credentials.
func (h *Handler) authenticate(w http.ResponseWriter, r *http.Request) (string, bool) {
	if h.Authenticate == nil {
		h.log().Error("media: Handler.Authenticate is not set")
		httpjson.Fail(w, http.StatusInternalServerError, "internal", "authentication is not configured")
		return "", false
	}
	user, err := h.Authenticate(r)
	if err == nil && user == "" {
		err = errors.New("no user")
	}
	if err != nil {
		w.Header().Set("WWW-Authenticate", "Bearer")
		httpjson.Fail(w, http.StatusUnauthorized, "not_authorized", err.Error())
		return "", false
	}
	return user, true
}

// BearerToken returns the token of r's "Authorization: Bearer" header, for
// use in Handler.Authenticate.
func BearerToken(r *http.Request) (string, error) {
	v := r.Header.Get("Authorization")
	if v == "" {
		return "", errors.New("missing Authorization header")
	}
	scheme, tok, _ := strings.Cut(v, " ")
	// The scheme is case-insensitive (RFC 9110 section 11.1).
	if !strings.EqualFold(scheme, "Bearer") {
		return "", errors.New("authorization is not a Bearer token")
	}
	tok = strings.TrimSpace(tok)
	if tok == "" {
		return "", errors.New("empty Bearer token")
	}
	return tok, nil
}

// contentType returns the type to store for header value v: v itself when
// it is a valid media type, the default when v is empty.
func contentType(v string) (string, error) {
	if v == "" {
		return defaultContentType, nil
	}
	if len(v) > maxContentTypeLen {
		return "", fmt.Errorf("content type longer than %d bytes", maxContentTypeLen)
	}
	if _, _, err := mime.ParseMediaType(v); err != nil {
		return "", fmt.Errorf("invalid content type: %w", err)
	}
	return v, nil
}

// bodyReader remembers the error reading the request body, to tell the
// client's failures from the store's.
type bodyReader struct {
	r   io.Reader
	err error
}

// Read implements io.Reader.
func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		b.err = err
	}
	return n, err
}

// tooLarge answers 413.
func (h *Handler) tooLarge(w http.ResponseWriter, limit int64) {
	httpjson.Fail(w, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("the file is larger than %d bytes", limit))
}

// notFound answers 404.
func (h *Handler) notFound(w http.ResponseWriter) {
	httpjson.Fail(w, http.StatusNotFound, "not_found", "no such media")
}

// maxBytes returns the effective upload limit.
func (h *Handler) maxBytes() int64 {
	if h.MaxBytes <= 0 {
		return DefaultMaxBytes
	}
	return h.MaxBytes
}

// ttl returns the effective upload lifetime.
func (h *Handler) ttl() time.Duration {
	if h.TTL <= 0 {
		return DefaultTTL
	}
	return h.TTL
}

// clock returns the current time by h.Now.
func (h *Handler) clock() time.Time { return clock(h.Now) }

// clock returns now(), or the wall clock's time when now is nil.
func clock(now func() time.Time) time.Time {
	if now == nil {
		return time.Now()
	}
	return now()
}

// log returns the logger to use.
func (h *Handler) log() *slog.Logger {
	if h.Logger == nil {
		return slog.Default()
	}
	return h.Logger
}
