package broker

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/chatd/chatd/config"
)

// TestWebPage serves the chat page from web.dir, tells the page where MQTT
// over WebSocket is, and signs anyone in only in development mode, with a
// token the MQTT listener accepts.
func TestWebPage(t *testing.T) {
	page := t.TempDir()
	if err := os.WriteFile(filepath.Join(page, "index.html"), []byte("<title>chat</title>"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		web      config.Web
		wantPage int  // status of GET /
		wantDev  bool // POST /v1/dev/token signs in
	}{
		{name: "off", web: config.Web{Dir: page}, wantPage: 404},
		{name: "page", web: config.Web{Enabled: true, Dir: page}, wantPage: 200},
		{name: "page not built", web: config.Web{Enabled: true, Dir: filepath.Join(page, "missing")}, wantPage: 503},
		{name: "development", web: config.Web{Enabled: true, Dev: true, Dir: page}, wantPage: 200, wantDev: true},
		{name: "development sign-in alone", web: config.Web{Dev: true, Dir: page}, wantPage: 404, wantDev: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, t.TempDir(), func(c *config.Config) {
				c.Web = tt.web
				c.WebSocket.Listen = "127.0.0.1:0"
			})
			resp, body := httpCall(t, nil, s, "GET", "/", nil, nil)
			if resp.StatusCode != tt.wantPage {
				t.Fatalf("GET /: %d %s, want %d", resp.StatusCode, body, tt.wantPage)
			}
			switch tt.wantPage {
			case 200:
				if string(body) != "<title>chat</title>" {
					t.Errorf("GET /: %q, want the built index.html", body)
				}
			case 503:
				if !strings.Contains(string(body), "make web") {
					t.Errorf("GET / of a page not built: %q, want how to build it", body)
				}
			}

			if resp, body := httpCall(t, nil, s, "GET", "/v1/nowhere", nil, nil); resp.StatusCode != 404 || (tt.web.Enabled && !strings.Contains(string(body), `"not_found"`)) {
				t.Errorf("GET /v1/nowhere: %d %s, want the API's 404", resp.StatusCode, body)
			}
			resp, body = httpCall(t, nil, s, "GET", "/web/config.json", nil, nil)
			if tt.web.Enabled || tt.web.Dev {
				var got struct {
					Port int  `json:"websocket_port"`
					Dev  bool `json:"dev"`
				}
				if err := json.Unmarshal(body, &got); err != nil || resp.StatusCode != 200 {
					t.Fatalf("config.json: %d %s %v", resp.StatusCode, body, err)
				}
				_, port, _ := net.SplitHostPort(s.WebSocketAddr())
				if strconv.Itoa(got.Port) != port || got.Dev != tt.wantDev {
					t.Errorf("config.json: %s, want websocket_port %s and dev %v", body, port, tt.wantDev)
				}
			} else if resp.StatusCode != 404 {
				t.Errorf("config.json with the page off: %d, want 404", resp.StatusCode)
			}

			st, body := bearerCall(t, s, "POST", "/v1/dev/token", "", `{"user":"alice"}`)
			if !tt.wantDev {
				if st == 200 || strings.Contains(string(body), "token") {
					t.Fatalf("sign-in outside development mode: %d %s", st, body)
				}
				return
			}
			var got struct {
				Token string `json:"token"`
				User  string `json:"user"`
			}
			if err := json.Unmarshal(body, &got); err != nil || st != 200 || got.User != "alice" {
				t.Fatalf("sign-in: %d %s %v", st, body, err)
			}
			alice := mustDial(t, s, "alice", phoneOpt{password: got.Token})
			bob := mustDial(t, s, "bob", phoneOpt{})
			alice.send("bob", "m-1", `,"text":"hi"`)
			if got := bob.waitFor(1); got[0].From != "alice" {
				t.Errorf("bob got %+v, want alice's message", got[0])
			}

			for _, bad := range []string{`{"user":"a/b"}`, `{"user":""}`, `not json`} {
				if st, body := bearerCall(t, s, "POST", "/v1/dev/token", "", bad); st != 400 {
					t.Errorf("sign-in with %s: %d %s, want 400", bad, st, body)
				}
			}
		})
	}
}
