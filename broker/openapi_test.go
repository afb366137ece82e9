package broker

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/chatd/chatd/broker/service/apidoc"
	"github.com/chatd/chatd/broker/service/apikeys"
)

// specCheck is an http.RoundTripper that validates every request and
// its answer against docs/openapi.yaml and records the operations seen.
type specCheck struct {
	t      *testing.T
	router routers.Router

	mu   sync.Mutex
	seen map[string]bool
}

func (c *specCheck) RoundTrip(req *http.Request) (*http.Response, error) {
	route, params, err := c.router.FindRoute(req)
	if err != nil {
		c.t.Errorf("%s %s: not in the OpenAPI document: %v", req.Method, req.URL.Path, err)
		return http.DefaultTransport.RoundTrip(req)
	}
	var body []byte
	if req.Body != nil {
		if body, err = io.ReadAll(req.Body); err != nil {
			return nil, err
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	in := &openapi3filter.RequestValidationInput{
		Request: req, PathParams: params, Route: route,
		Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc},
	}
	// A request the server must refuse is sent on purpose: only requests
	// meant to be valid are checked, those the test marks.
	if req.Header.Get("X-Spec-Valid") == "1" {
		if err := openapi3filter.ValidateRequest(context.Background(), in); err != nil {
			c.t.Errorf("%s %s: request does not match the document: %v", req.Method, req.URL.Path, err)
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	rb, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(rb))
	out := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: in, Status: resp.StatusCode, Header: resp.Header,
		Body:    io.NopCloser(bytes.NewReader(rb)),
		Options: &openapi3filter.Options{IncludeResponseStatus: true},
	}
	if err := openapi3filter.ValidateResponse(context.Background(), out); err != nil {
		c.t.Errorf("%s %s: answer %d does not match the document: %v\n%s", req.Method, req.URL.Path, resp.StatusCode, err, rb)
	}
	c.mu.Lock()
	c.seen[route.Operation.OperationID] = true
	c.mu.Unlock()
	return resp, nil
}

// TestOpenAPIConformance calls every operation of docs/openapi.yaml on a
// real server, valid calls and refusals, and checks each request and
// answer against the document; the document served at
// /v1/openapi.json is the same.
func TestOpenAPIConformance(t *testing.T) {
	s := startServer(t, t.TempDir(), nil)
	doc, err := apidoc.Load()
	if err != nil {
		t.Fatal(err)
	}
	doc.Servers = openapi3.Servers{{URL: "http://" + s.HTTPAddr()}}
	router, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	check := &specCheck{t: t, router: router, seen: map[string]bool{}}
	client := &http.Client{Transport: check}
	call := func(method, path, bearer, contentType, body string, valid bool, want int) []byte {
		t.Helper()
		hdr := http.Header{}
		if bearer != "" {
			hdr.Set("Authorization", "Bearer "+bearer)
		}
		if contentType != "" {
			hdr.Set("Content-Type", contentType)
		}
		if valid {
			hdr.Set("X-Spec-Valid", "1")
		}
		resp, b := httpCall(t, client, s, method, path, hdr, strings.NewReader(body))
		if resp.StatusCode != want {
			t.Errorf("%s %s: %d %s, want %d", method, path, resp.StatusCode, b, want)
		}
		return b
	}
	const js = "application/json"
	alice := mint(t, "alice")
	send := makeKey(t, s, apikeys.ScopeSend)
	mod := makeKey(t, s, apikeys.ScopeModerate)
	read := makeKey(t, s, apikeys.ScopeRead)
	mustDial(t, s, "alice", phoneOpt{clientID: "alice/phone"})

	call("GET", "/healthz", "", "", "", true, 200)
	call("GET", "/readyz", "", "", "", true, 200)
	call("GET", "/metrics", "", "", "", true, 200)
	call("GET", "/cluster/status", "", "", "", true, 404)
	served := call("GET", "/v1/openapi.json", "", "", "", true, 200)
	if _, err := openapi3.NewLoader().LoadFromData(served); err != nil {
		t.Errorf("served document: %v", err)
	}

	call("POST", "/v1/groups", alice, js, `{"id":"g1","members":["bob"]}`, true, 201)
	call("POST", "/v1/groups", alice, js, `{"id":"g1","members":["bob"]}`, true, 409)
	call("POST", "/v1/groups", "", js, `{"id":"g2"}`, true, 401)
	call("GET", "/v1/groups/g1", alice, "", "", true, 200)
	call("GET", "/v1/groups/nope", alice, "", "", true, 404)
	call("PUT", "/v1/groups/g1/members/carol", alice, "", "", true, 200)
	call("DELETE", "/v1/groups/g1/members/carol", alice, "", "", true, 200)
	call("DELETE", "/v1/groups/g1/members/bob", mint(t, "carol"), "", "", true, 404) // not a member: no group to see

	up := call("POST", "/v1/media", alice, "image/png", "not really a png", true, 201)
	id := string(up[strings.Index(string(up), `"id":"`)+6:])
	id = id[:strings.IndexByte(id, '"')]
	call("GET", "/v1/media/"+id, alice, "", "", true, 200)
	call("GET", "/v1/media/nope", alice, "", "", true, 404)

	call("GET", "/v1/devices", alice, "", "", true, 200)
	call("DELETE", "/v1/devices/alice/tablet", alice, "", "", true, 404)
	call("DELETE", "/v1/devices/alice/phone", alice, "", "", true, 204)
	call("DELETE", "/v1/devices/alice", alice, "", "", true, 404)

	call("POST", "/v1/server/messages", send, js, `{"to":["bob"],"message":{"id":"m-1","text":"hi"}}`, true, 200)
	call("POST", "/v1/server/messages", send, js, `{"group":"g1","from":"bot","message":{"id":"m-2"}}`, true, 200)
	call("POST", "/v1/server/messages", send, js, `{"group":"nope","message":{"id":"m-3"}}`, true, 404)
	call("POST", "/v1/server/messages", send, js, `{"to":["bob"],"message":{}}`, false, 400)
	call("POST", "/v1/server/messages", alice, js, `{"to":["bob"],"message":{"id":"m-4"}}`, true, 401)
	call("POST", "/v1/server/messages", read, js, `{"to":["bob"],"message":{"id":"m-4"}}`, true, 403)

	call("POST", "/v1/server/disconnect", mod, js, `{"user":"alice"}`, true, 204)
	call("POST", "/v1/server/disconnect", mod, js, `{}`, true, 400)
	call("PUT", "/v1/server/bans/mallory", mod, js, `{"reason":"spam","duration_s":60}`, true, 200)
	call("GET", "/v1/server/bans", mod, "", "", true, 200)
	call("DELETE", "/v1/server/bans/mallory", mod, "", "", true, 204)
	call("DELETE", "/v1/server/bans/mallory", mod, "", "", true, 404)
	call("POST", "/v1/server/revocations", mod, js, `{"user":"mallory"}`, true, 200)
	call("POST", "/v1/server/revocations", mod, js, `{"jti":"t-1","expires":`+fmt.Sprint(time.Now().Add(time.Hour).Unix())+`}`, true, 200)
	call("POST", "/v1/server/revocations", mod, js, `{}`, true, 400)
	call("GET", "/v1/server/revocations", mod, "", "", true, 200)

	call("POST", "/v1/server/presence", read, js, `{"users":["alice","bob"]}`, true, 200)
	call("POST", "/v1/server/presence", read, js, `{"users":[]}`, false, 400)
	call("GET", "/v1/server/users/alice", read, "", "", true, 200)
	call("GET", "/v1/server/info", read, "", "", true, 200)
	erase := makeKey(t, s, apikeys.ScopeErase)
	call("GET", "/v1/server/users/alice/export", erase, "", "", true, 200)
	call("GET", "/v1/server/users/alice/export", read, "", "", true, 403)
	call("DELETE", "/v1/server/users/bad%20user", erase, "", "", true, 400)

	call("DELETE", "/v1/groups/g1", alice, "", "", true, 204)
	call("DELETE", "/v1/server/users/alice", erase, "", "", true, 200)

	var missing []string
	for _, path := range doc.Paths.InMatchingOrder() {
		for _, op := range doc.Paths.Value(path).Operations() {
			if !check.seen[op.OperationID] {
				missing = append(missing, op.OperationID)
			}
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Errorf("operations never called: %v", missing)
	}
}
