package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/goleak"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// runAsMain makes the test binary behave as chatd when set, so that the
// signal and exit-status tests can run it as a child process.
const runAsMain = "CHATD_CMD_TEST_RUN_AS_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runAsMain) == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// isolate clears CHATD_* variables and runs the test in an empty directory.
func isolate(t *testing.T) string {
	t.Helper()
	for _, s := range config.Settings() {
		t.Setenv(s.Env, "")
	}
	dir := t.TempDir()
	t.Chdir(dir)
	return dir
}

// run executes chatd with args in-process and returns its stdout and stderr.
func run(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	var out, errOut testutil.SyncBuffer
	cmd := newRootCmd()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	err = cmd.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

func TestToken(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		secret   string // configured secret to verify with; "" means the dev secret
		ttl      time.Duration
		wantErr  string
		wantNote bool
	}{
		{name: "development secret", args: []string{"token", "alice"}, ttl: 24 * time.Hour, wantNote: true},
		{name: "ttl and data dir", args: []string{"token", "bob.1", "--ttl", "1h", "--data-dir", "elsewhere"}, ttl: time.Hour, wantNote: true},
		{name: "configured secret", args: []string{"token", "carol"}, env: map[string]string{"CHATD_AUTH_SECRET": "configured-secret-0123456789abcdef"}, secret: "configured-secret-0123456789abcdef", ttl: 24 * time.Hour},
		{name: "bad user", args: []string{"token", "al ice"}, wantErr: "al ice"},
		{name: "user too long", args: []string{"token", strings.Repeat("a", 65)}, wantErr: "1-64"},
		{name: "no user", args: []string{"token"}, wantErr: "arg"},
		{name: "zero ttl", args: []string{"token", "alice", "--ttl", "0s"}, wantErr: "--ttl"},
		{name: "bad config", args: []string{"token", "alice"}, env: map[string]string{"CHATD_QUEUE_SYNC": "sometimes"}, wantErr: "queue.sync"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			isolate(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			stdout, stderr, err := run(t.Context(), tt.args...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("chatd %v: %v", tt.args, err)
			}
			if !strings.HasSuffix(stdout, "\n") || strings.Count(stdout, "\n") != 1 {
				t.Fatalf("stdout %q is not one line", stdout)
			}
			tok := strings.TrimSuffix(stdout, "\n")
			if got := strings.Contains(stderr, "development secret"); got != tt.wantNote {
				t.Errorf("stderr %q: development note %v, want %v", stderr, got, tt.wantNote)
			}
			dataDir := "data"
			for i, a := range tt.args {
				if a == "--data-dir" {
					dataDir = tt.args[i+1]
				}
			}
			secret, _, err := token.ResolveSecret(tt.secret, dataDir)
			if err != nil {
				t.Fatal(err)
			}
			user := tt.args[1]
			if _, err := token.NewVerifier(secret).Verify(tok, user); err != nil {
				t.Fatalf("printed token refused: %v", err)
			}
			var claims jwt.RegisteredClaims
			if _, _, err := jwt.NewParser().ParseUnverified(tok, &claims); err != nil {
				t.Fatal(err)
			}
			if left := time.Until(claims.ExpiresAt.Time); left > tt.ttl || left < tt.ttl-time.Minute {
				t.Errorf("token expires in %v, want about %v", left, tt.ttl)
			}
		})
	}
}

var startedRE = regexp.MustCompile(`msg="chatd started" mqtt=(\S+) http=(\S+)`)

// waitStarted waits for the start-up log line and returns the addresses in it.
func waitStarted(t *testing.T, logs *testutil.SyncBuffer, done <-chan error) (mqttAddr, httpAddr string) {
	t.Helper()
	testutil.EventuallyNoError(t, 10*time.Second, func() error {
		if m := startedRE.FindStringSubmatch(logs.String()); m != nil {
			mqttAddr, httpAddr = m[1], m[2]
			return nil
		}
		select {
		case err := <-done:
			t.Fatalf("serve returned before starting: %v\n%s", err, logs)
		default:
		}
		return fmt.Errorf("no start-up line in:\n%s", logs)
	}, "waiting for chatd to start")
	return mqttAddr, httpAddr
}

// serveBackground runs chatd serve on loopback ports chosen by the
// system until ctx ends, with its log in logs; done receives its end.
func serveBackground(ctx context.Context) (logs *testutil.SyncBuffer, done <-chan error) {
	logs = new(testutil.SyncBuffer)
	cmd := newRootCmd()
	cmd.SetArgs([]string{"serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"})
	cmd.SetErr(logs)
	end := make(chan error, 1)
	go func() { end <- cmd.ExecuteContext(ctx) }()
	return logs, end
}

// waitServeEnd waits for a cancelled serveBackground to end, cleanly.
func waitServeEnd(t *testing.T, logs *testutil.SyncBuffer, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v\n%s", err, logs.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop within 15s of cancellation")
	}
}

func TestServe(t *testing.T) {
	isolate(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs, done := serveBackground(ctx)
	mqttAddr, httpAddr := waitStarted(t, logs, done)
	for _, want := range []string{"level=WARN", "development secret", "chatd token USER --data-dir data", "data_dir=data", "sync=batch"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("logs lack %q:\n%s", want, logs.String())
		}
	}
	conn, err := net.Dial("tcp", mqttAddr)
	if err != nil {
		t.Fatalf("dial mqtt %s: %v", mqttAddr, err)
	}
	conn.Close()
	resp, err := http.Get("http://" + httpAddr + "/healthz")
	if err != nil {
		t.Fatalf("GET /healthz: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /healthz: %s", resp.Status)
	}

	cancel()
	waitServeEnd(t, logs, done)
	if !strings.Contains(logs.String(), "chatd stopped") {
		t.Errorf("no shutdown line:\n%s", logs.String())
	}
	goleak.VerifyNone(t)
}

func TestServeStartupErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
	}{
		{name: "mqtt address in use", args: []string{"--listen", busy.Addr().String(), "--http", "127.0.0.1:0"}, wantErr: busy.Addr().String()},
		{name: "http address in use", args: []string{"--listen", "127.0.0.1:0", "--http", busy.Addr().String()}, wantErr: busy.Addr().String()},
		{name: "invalid setting", env: map[string]string{"CHATD_LIMITS_MAX_INFLIGHT": "0"}, wantErr: "limits.max_inflight"},
		{name: "missing config file", args: []string{"--config", "missing.yaml"}, wantErr: "missing.yaml"},
		{name: "stray argument", args: []string{"now"}, wantErr: "now"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			isolate(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			_, _, err := run(t.Context(), append([]string{"serve"}, tt.args...)...)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
			// A failed start must release what it opened.
			goleak.VerifyNone(t)
		})
	}
}

// TestServeSignal runs chatd as a child process and stops it the way an
// operator or a process supervisor does.
func TestServeSignal(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := isolate(t)
			var logs testutil.SyncBuffer
			cmd := exec.Command(os.Args[0], "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir", filepath.Join(dir, "data"))
			cmd.Env = append(os.Environ(), runAsMain+"=1")
			cmd.Stderr = &logs
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			waitStarted(t, &logs, done)
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("chatd exited with %v after %v:\n%s", err, sig, logs.String())
				}
			case <-time.After(15 * time.Second):
				if err := cmd.Process.Kill(); err != nil {
					t.Error(err)
				}
				t.Fatalf("chatd did not exit within 15s of %v", sig)
			}
			if !strings.Contains(logs.String(), "chatd stopped") {
				t.Errorf("no shutdown line:\n%s", logs.String())
			}
		})
	}
}

func TestServeHelpListsEveryKey(t *testing.T) {
	help := serveLong()
	for _, s := range config.Settings() {
		if !strings.Contains(help, s.Key+" = "+s.Default) || !strings.Contains(help, s.Env) {
			t.Errorf("serve help lacks %s = %s (%s)", s.Key, s.Default, s.Env)
		}
	}
}

func TestShellQuote(t *testing.T) {
	tests := []struct{ in, want string }{
		{"data", "data"},
		{"/var/lib/chatd", "/var/lib/chatd"},
		{"my data", "'my data'"},
		{"it's", `'it'\''s'`},
		{"", "''"},
	}
	for _, tt := range tests {
		if got := shellQuote(tt.in); got != tt.want {
			t.Errorf("shellQuote(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
