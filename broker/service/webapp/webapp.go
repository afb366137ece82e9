// Package webapp serves the browser chat page and the live dashboard (the
// web/ folder, built with npm into a directory) on the HTTP listener, and,
// in development mode only, a sign-in that mints a token for any user.
//
// The page is read from disk, not embedded: the Go build never needs Node.js,
// and a page built after the server started is served at once.
package webapp

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/chatd/chatd/broker/protocol/topic"
	"github.com/chatd/chatd/broker/service/httpjson"
)

// DevTokenTTL is how long a development sign-in's token lasts.
const DevTokenTTL = 24 * time.Hour

// Handler serves the page, its settings and the development sign-in.
type Handler struct {
	// Dir is the built page's directory; "" serves no page (development
	// sign-in alone).
	Dir string
	// WebSocket returns the MQTT-over-WebSocket listener's address, "" when
	// there is none; the page connects to its port.
	WebSocket func() string
	// WebSocketTLS says the WebSocket listener speaks wss://.
	WebSocketTLS bool
	// Mint returns a token for user; nil outside development mode, which
	// leaves POST /v1/dev/token unrouted.
	Mint func(user string, ttl time.Duration) (string, error)
	// Now is the clock of the tokens' expiry as told to the page.
	Now func() time.Time
	// Log receives failures to serve.
	Log *slog.Logger
}

// Settings is what the page reads from /web/config.json.
type Settings struct {
	// WebSocketPort is the port of MQTT over WebSocket on the page's host, 0 if none.
	WebSocketPort int `json:"websocket_port"`
	// WebSocketTLS says to use wss://.
	WebSocketTLS bool `json:"websocket_tls"`
	// WebSocketPath is the WebSocket listener's path.
	WebSocketPath string `json:"websocket_path"`
	// Dev says POST /v1/dev/token signs anyone in.
	Dev bool `json:"dev"`
}

// Register adds the handler's routes to mux; GET / and every path no
// other route takes are the page's files.
func (h *Handler) Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /web/config.json", h.settings)
	if h.Mint != nil {
		mux.HandleFunc("POST /v1/dev/token", h.signIn)
	}
	if h.Dir != "" {
		mux.Handle("GET /", h.files())
	}
}

func (h *Handler) settings(w http.ResponseWriter, _ *http.Request) {
	s := Settings{WebSocketTLS: h.WebSocketTLS, WebSocketPath: "/mqtt", Dev: h.Mint != nil}
	if h.WebSocket != nil {
		if _, port, err := net.SplitHostPort(h.WebSocket()); err == nil {
			s.WebSocketPort, _ = strconv.Atoi(port)
		}
	}
	w.Header().Set("Cache-Control", "no-store")
	httpjson.Write(w, http.StatusOK, s)
}

// signIn answers {"token","user","expires_at"} for {"user"}.
func (h *Handler) signIn(w http.ResponseWriter, r *http.Request) {
	var req struct {
		User string `json:"user"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1024)).Decode(&req); err != nil {
		httpjson.Fail(w, http.StatusBadRequest, "bad_request", "the body must be {\"user\":\"...\"}: "+err.Error())
		return
	}
	if !topic.ValidUser(req.User) {
		httpjson.Fail(w, http.StatusBadRequest, "bad_user", "user must be 1-64 characters of A-Z a-z 0-9 _ . -")
		return
	}
	tok, err := h.Mint(req.User, DevTokenTTL)
	if err != nil {
		httpjson.Internal(w, h.Log, "development sign-in", err)
		return
	}
	h.Log.Warn("development sign-in: a token was given without any check", "user", req.User, "remote", r.RemoteAddr)
	httpjson.Write(w, http.StatusOK, map[string]any{
		"token": tok, "user": req.User, "expires_at": h.Now().Add(DevTokenTTL).Unix(),
	})
}

// notBuilt is the page served while Dir holds no index.html.
const notBuilt = `<!doctype html><meta charset="utf-8"><title>chatd: the chat page is not built</title>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>The chat page is not built</h1>
<p>chatd serves it from <code>%s</code>, which holds no <code>index.html</code>.</p>
<p>Build it with Node.js 20 or later and npm (<code>apt-get install nodejs npm</code>), then reload this page:</p>
<pre>make web</pre>
<p>(<code>make run</code> builds it too when npm is present.)</p>`

// files serves Dir, or says how to build it when it is not built.
func (h *Handler) files() http.Handler {
	fs := http.FileServer(http.Dir(h.Dir))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/v1/") {
			// An API path no route took: the API's own error, not a page.
			httpjson.Fail(w, http.StatusNotFound, "not_found", "no such API path")
			return
		}
		if _, err := os.Stat(filepath.Join(h.Dir, "index.html")); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				h.Log.Error("chat page", "dir", h.Dir, "error", err)
			}
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, notBuilt, h.Dir)
			return
		}
		// The page is rebuilt in place during development: no stale copy.
		w.Header().Set("Cache-Control", "no-cache")
		fs.ServeHTTP(w, r)
	})
}
