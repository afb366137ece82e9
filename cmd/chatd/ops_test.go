package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
)

// TestCheckConfig: a good configuration passes with a summary, and each
// kind of mistake fails naming its key, without starting anything.
func TestCheckConfig(t *testing.T) {
	dir := isolate(t)
	cert, key := selfSigned(t, dir)
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name    string
		yaml    string
		wantErr string // "" for success
	}{
		{name: "defaults", yaml: ""},
		{name: "tls", yaml: "tls:\n  listen: 127.0.0.1:8883\n  cert_file: " + cert + "\n  key_file: " + key + "\n"},
		{name: "missing certificate", yaml: "tls:\n  listen: 127.0.0.1:8883\n  cert_file: " + dir + "/nope.pem\n  key_file: " + key + "\n", wantErr: "tls.cert_file"},
		{name: "key of another certificate", yaml: "tls:\n  listen: 127.0.0.1:8883\n  cert_file: " + cert + "\n  key_file: " + write("other.key", string(keyPEM(t))) + "\n", wantErr: "private key does not match"},
		{name: "webhook not http", yaml: "push:\n  webhook: ftp://example.com/push\n", wantErr: "push.webhook"},
		{name: "unknown key", yaml: "queue:\n  synk: always\n", wantErr: "queue.synk"},
		{name: "bad value", yaml: "queue:\n  sync: sometimes\n", wantErr: "queue.sync"},
		{name: "issuer key not PEM", yaml: "auth:\n  issuers:\n    - issuer: https://idp.example.com/\n      public_key_file: " + write("idp.pem", "not a key") + "\n", wantErr: "public_key_file"},
		{name: "page not built", yaml: "web:\n  enabled: true\n  dir: " + dir + "/no-page\n", wantErr: "web.dir"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			file := write(strings.ReplaceAll(tt.name, " ", "-")+".yaml", tt.yaml)
			out, _, err := run(context.Background(), "checkconfig", "--config", file, "--data-dir", filepath.Join(dir, "data"))
			if tt.wantErr == "" {
				if err != nil || !strings.Contains(out, ": ok") {
					t.Fatalf("checkconfig: %v, out %q; want ok", err, out)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("checkconfig: %v; want an error naming %s", err, tt.wantErr)
			}
		})
	}
}

// TestDefaultConfigAndVersion: defaultconfig's file passes checkconfig,
// and version names the Go version.
func TestDefaultConfigAndVersion(t *testing.T) {
	dir := isolate(t)
	out, _, err := run(context.Background(), "defaultconfig")
	if err != nil || !strings.Contains(out, "queue:") || !strings.Contains(out, "CHATD_QUEUE_SYNC") {
		t.Fatalf("defaultconfig: %v\n%s", err, out)
	}
	file := filepath.Join(dir, "chatd.yaml")
	if err := os.WriteFile(file, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, _, err := run(context.Background(), "checkconfig", "--config", file); err != nil {
		t.Fatalf("checkconfig of defaultconfig's file: %v\n%s", err, out)
	}
	out, _, err = run(context.Background(), "version")
	if err != nil || !strings.HasPrefix(out, "chatd ") || !strings.Contains(out, "go1.") {
		t.Errorf("version: %v, %q", err, out)
	}
}

// keyPEM returns a new EC private key in PEM.
func keyPEM(t *testing.T) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// selfSigned writes a self-signed certificate and its key into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	kp := keyPEM(t)
	blk, _ := pem.Decode(kp)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "chatd"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.(*ecdsa.PrivateKey).Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// TestServeReload: SIGHUP reads the configuration file again, applies
// what it can, names what needs a restart, and refuses a broken file
// while running on.
func TestServeReload(t *testing.T) {
	dir := isolate(t)
	file := filepath.Join(dir, "chatd.yaml")
	writeConfig := func(body string) {
		if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("log:\n  level: info\n")
	var logs testutil.SyncBuffer
	cmd := exec.Command(os.Args[0], "serve", "--config", file, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--data-dir", filepath.Join(dir, "data"))
	cmd.Env = append(os.Environ(), runAsMain+"=1")
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	waitStarted(t, &logs, done)
	hup := func(want string) {
		t.Helper()
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		testutil.EventuallyNoError(t, 10*time.Second, func() error {
			if !strings.Contains(logs.String(), want) {
				return fmt.Errorf("no %q in:\n%s", want, logs.String())
			}
			return nil
		}, "SIGHUP not answered")
	}
	writeConfig("log:\n  level: debug\nlimits:\n  publish_rate: 50\nqueue:\n  message_ttl: 1h\n")
	hup("keys=[queue.message_ttl]")
	for _, want := range []string{"applied=\"[limits.publish_rate log.level]\"", "configuration changes that need a restart"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("no %q in the log:\n%s", want, logs.String())
		}
	}
	writeConfig("queue:\n  sync: sometimes\n")
	hup("reload refused")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("chatd exited with %v after reloads:\n%s", err, logs.String())
	}
	done <- nil // for the cleanup
}

// TestProbe: probe exits 0 for a ready node and a live one, 1 for a node
// that is not ready or not there.
func TestProbe(t *testing.T) {
	isolate(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs, done := serveBackground(ctx)
	_, httpAddr := waitStarted(t, logs, done)
	for _, args := range [][]string{{"probe", "--http", httpAddr}, {"probe", "live", "--http", httpAddr}} {
		if out, _, err := run(context.Background(), args...); err != nil || !strings.Contains(out, "ready") && !strings.Contains(out, "ok") {
			t.Errorf("chatd %v: %v, %q", args, err, out)
		}
	}
	cancel()
	<-done
	if _, _, err := run(context.Background(), "probe", "--http", httpAddr, "--timeout", "1s"); err == nil {
		t.Error("probe of a stopped node passed")
	}
	if _, _, err := run(context.Background(), "probe", "sideways"); err == nil {
		t.Error("probe took an unknown argument")
	}
}
