package main

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"go.yaml.in/yaml/v3"

	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// root is the repository's root, from this package's directory (go
// test's working directory).
const root = "../.."

// The compose files and what they mount, relative to root.
var (
	composeDir     = filepath.Join(root, "deploy", "compose")
	singleCompose  = filepath.Join(composeDir, "docker-compose.yml")
	clusterCompose = filepath.Join(composeDir, "cluster.yml")
)

// testVersion is the version the test images are built as.
const testVersion = "v1.2.3-imagetest"

// testEpoch is the SOURCE_DATE_EPOCH of the test images.
const testEpoch = 1764145476

// Secrets the compose files' required variables are given, 32 bytes and
// more as chatd wants them.
var composeVars = map[string]string{
	"CHATD_AUTH_SECRET":      "auth-secret-for-the-compose-test-0123456789",
	"CHATD_CLUSTER_PASSWORD": "cluster-password-for-the-compose-test-0123456789",
}

// buildStatic builds chatd as the image wants it, static and -trimpath,
// and returns its path.
func buildStatic(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "chatd")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./cmd/chatd")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build -trimpath ./cmd/chatd: %v\n%s", err, out)
	}
	return bin
}

// fileEntry is one file or directory read back from the image's layer.
type fileEntry struct {
	hdr  *tar.Header
	body []byte
}

// layerFiles returns the entries of layer by their path, with a leading
// slash and without a trailing one.
func layerFiles(t *testing.T, layer v1.Layer) map[string]fileEntry {
	t.Helper()
	rc, err := layer.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]fileEntry{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read the layer: %v", err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatalf("read %s from the layer: %v", h.Name, err)
		}
		p := "/" + strings.TrimSuffix(path.Clean(h.Name), "/")
		if _, dup := files[p]; dup {
			t.Errorf("the layer holds %s twice", p)
		}
		files[p] = fileEntry{hdr: h, body: body}
	}
	return files
}

// TestImage builds chatd statically, builds its image, reads the image back
// from the tarball and the OCI layout and checks its config and its one
// layer, then runs it where a container engine can.
func TestImage(t *testing.T) {
	bin := buildStatic(t)
	t.Setenv("SOURCE_DATE_EPOCH", strconv.Itoa(testEpoch))
	out := t.TempDir()
	tarPath := filepath.Join(out, "chatd-image.tar")
	ociDir := filepath.Join(out, "oci")
	var stdout, stderr bytes.Buffer
	start := time.Now()
	err := run([]string{"--binary", bin, "--version", testVersion, "--revision", "0123abc", "--out", tarPath, "--oci-layout", ociDir}, &stdout, &stderr)
	if err != nil {
		t.Fatalf("run: %v\nstderr: %s", err, stderr.String())
	}
	t.Logf("built and wrote the image in %v", time.Since(start).Round(time.Millisecond))
	for _, want := range []string{tarPath, ociDir, "chatd:1.2.3-imagetest", "chatd:latest"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("stdout %q does not name %s", stdout.String(), want)
		}
	}

	// Both tags name the same image in the tarball.
	var img v1.Image
	for _, tag := range []string{"chatd:1.2.3-imagetest", "chatd:latest"} {
		ref, err := name.NewTag(tag)
		if err != nil {
			t.Fatal(err)
		}
		i, err := tarball.ImageFromPath(tarPath, &ref)
		if err != nil {
			t.Fatalf("read %s from the tarball: %v", tag, err)
		}
		if img == nil {
			img = i
			continue
		}
		d1, _ := img.Digest()
		d2, _ := i.Digest()
		if d1 != d2 {
			t.Errorf("the tags name different images: %s, %s", d1, d2)
		}
	}
	if fi, err := os.Stat(tarPath); err == nil {
		t.Logf("the tarball is %.1f MiB", float64(fi.Size())/(1<<20))
	}

	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if c.User != "65532:65532" {
		t.Errorf("User = %q, want 65532:65532 (not root)", c.User)
	}
	if !slices.Equal(c.Entrypoint, []string{"/chatd"}) {
		t.Errorf("Entrypoint = %q", c.Entrypoint)
	}
	if !slices.Equal(c.Cmd, []string{"serve", "--config", "/etc/chatd/chatd.yaml"}) {
		t.Errorf("Cmd = %q", c.Cmd)
	}
	if c.WorkingDir != "/var/lib/chatd" {
		t.Errorf("WorkingDir = %q", c.WorkingDir)
	}
	if got := slices.Sorted(maps.Keys(c.ExposedPorts)); !slices.Equal(got, []string{"1883/tcp", "8080/tcp", "8083/tcp"}) {
		t.Errorf("ExposedPorts = %q", got)
	}
	if got := slices.Sorted(maps.Keys(c.Volumes)); !slices.Equal(got, []string{"/var/lib/chatd"}) {
		t.Errorf("Volumes = %q", got)
	}
	if c.Healthcheck == nil || !slices.Equal(c.Healthcheck.Test, []string{"CMD", "/chatd", "probe", "--http", "127.0.0.1:8080"}) {
		t.Errorf("Healthcheck = %+v", c.Healthcheck)
	} else if c.Healthcheck.Interval <= 0 || c.Healthcheck.Timeout <= 5*time.Second || c.Healthcheck.Retries <= 0 {
		t.Errorf("Healthcheck timing = %+v: want an interval, a timeout over probe's own 5s, and retries", c.Healthcheck)
	}
	wantLabels := map[string]string{
		"org.opencontainers.image.title":    "chatd",
		"org.opencontainers.image.source":   "https://github.com/chatd/chatd",
		"org.opencontainers.image.version":  "1.2.3-imagetest",
		"org.opencontainers.image.revision": "0123abc",
		"org.opencontainers.image.licenses": "NOASSERTION",
		"org.opencontainers.image.created":  "2025-11-26T08:24:36Z",
	}
	for k, v := range wantLabels {
		if c.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, c.Labels[k], v)
		}
	}
	if c.Labels["org.opencontainers.image.description"] == "" {
		t.Error("no description label")
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if !cf.Created.Time.Equal(time.Unix(testEpoch, 0)) {
		t.Errorf("Created = %v, want SOURCE_DATE_EPOCH", cf.Created.Time)
	}

	// One layer, no base image.
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 || len(cf.RootFS.DiffIDs) != 1 || len(cf.History) != 1 {
		t.Fatalf("%d layers, %d diff IDs, %d history entries; want exactly one of each (no base image)", len(layers), len(cf.RootFS.DiffIDs), len(cf.History))
	}
	files := layerFiles(t, layers[0])
	var names []string
	for p := range files {
		names = append(names, p)
	}
	slices.Sort(names)
	wantNames := []string{"/chatd", "/etc", "/etc/chatd", "/etc/chatd/chatd.yaml", "/etc/group", "/etc/passwd", "/tmp", "/var", "/var/lib", "/var/lib/chatd"}
	if !slices.Equal(names, wantNames) {
		t.Errorf("the layer holds %q, want %q", names, wantNames)
	}
	for _, w := range []struct {
		path     string
		dir      bool
		mode     fs.FileMode
		uid, gid int
	}{
		{"/chatd", false, 0o755, 0, 0},
		{"/etc/chatd/chatd.yaml", false, 0o644, 0, 0},
		{"/etc/passwd", false, 0o644, 0, 0},
		{"/etc/group", false, 0o644, 0, 0},
		{"/etc/chatd", true, 0o755, 0, 0},
		{"/tmp", true, 0o777 | fs.ModeSticky, 0, 0},
		{"/var/lib/chatd", true, 0o750, 65532, 65532},
	} {
		e, ok := files[w.path]
		if !ok {
			continue // reported above
		}
		fi := e.hdr.FileInfo()
		if fi.IsDir() != w.dir || (!w.dir && e.hdr.Typeflag != tar.TypeReg) {
			t.Errorf("%s: type %q, want a directory: %v", w.path, e.hdr.Typeflag, w.dir)
		}
		if got := fi.Mode() & (fs.ModePerm | fs.ModeSticky); got != w.mode {
			t.Errorf("%s: mode %v, want %v", w.path, got, w.mode)
		}
		if e.hdr.Uid != w.uid || e.hdr.Gid != w.gid {
			t.Errorf("%s: owner %d:%d, want %d:%d", w.path, e.hdr.Uid, e.hdr.Gid, w.uid, w.gid)
		}
		if !e.hdr.ModTime.Equal(time.Unix(testEpoch, 0)) {
			t.Errorf("%s: mtime %v, want SOURCE_DATE_EPOCH", w.path, e.hdr.ModTime)
		}
	}
	want, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(files["/chatd"].body, want) {
		t.Error("/chatd is not the binary given")
	}
	checkStaticELF(t, files["/chatd"].body)
	if !strings.Contains(string(files["/etc/passwd"].body), "\nchatd:x:65532:65532:") {
		t.Errorf("/etc/passwd names no user chatd 65532:\n%s", files["/etc/passwd"].body)
	}
	if !strings.Contains(string(files["/etc/group"].body), "\nchatd:x:65532:") {
		t.Errorf("/etc/group names no group chatd 65532:\n%s", files["/etc/group"].body)
	}

	// The configuration in the image is what chatd loads, the listeners
	// on every address of the container, the data in the volume.
	conf := files["/etc/chatd/chatd.yaml"].body
	if !strings.Contains(string(conf), "CHATD_AUTH_SECRET") {
		t.Error("the configuration does not say that auth.secret comes from CHATD_AUTH_SECRET")
	}
	clearChatdEnv(t)
	confFile := filepath.Join(t.TempDir(), "chatd.yaml")
	if err := os.WriteFile(confFile, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CHATD_DATA_DIR", t.TempDir()) // not the host's /var/lib/chatd
	cfg, err := config.Load(confFile, nil)
	if err != nil {
		t.Fatalf("the image's configuration does not load: %v", err)
	}
	if cfg.Listen != "0.0.0.0:1883" || cfg.HTTP != "0.0.0.0:8080" || cfg.WebSocket.Listen != "0.0.0.0:8083" {
		t.Errorf("listeners %s, %s, %s; want 1883, 8080 and 8083 on 0.0.0.0", cfg.Listen, cfg.HTTP, cfg.WebSocket.Listen)
	}
	var raw map[string]any
	if err := yaml.Unmarshal(conf, &raw); err != nil || raw["data_dir"] != "/var/lib/chatd" {
		t.Errorf("data_dir in the image's configuration = %v (%v), want /var/lib/chatd", raw["data_dir"], err)
	}

	// The OCI layout holds the same image under its version.
	idx, err := layout.ImageIndexFromPath(ociDir)
	if err != nil {
		t.Fatalf("read the OCI layout: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	if len(im.Manifests) != 1 || im.Manifests[0].Digest != digest || im.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "1.2.3-imagetest" {
		t.Errorf("OCI layout index %+v, want the image %s named 1.2.3-imagetest", im.Manifests, digest)
	}

	t.Run("container", func(t *testing.T) { runContainer(t, img) })
}

// checkStaticELF fails t unless bin is an executable that needs no
// dynamic loader: no PT_INTERP program header, no dynamic section.
func checkStaticELF(t *testing.T, bin []byte) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		t.Fatalf("/chatd is no ELF file: %v", err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("/chatd has a %v program header: dynamically linked", p.Type)
		}
	}
	if f.Section(".dynamic") != nil {
		t.Error("/chatd has a .dynamic section: dynamically linked")
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("/chatd needs %q", libs)
	}
}

// clearChatdEnv unsets every CHATD_* variable for the rest of t, so that
// only what the test sets reaches config.Load.
func clearChatdEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, config.EnvPrefix+"_") {
			t.Setenv(k, "") // restored after t
			os.Unsetenv(k)
		}
	}
}

// TestRefusals checks that chatd-image refuses what would make a broken
// image, or none, and leaves no file behind; and that --help helps.
func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "x.tar")
	notELF := filepath.Join(dir, "not-elf")
	if err := os.WriteFile(notELF, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--out", out}, "--binary is required"},
		{[]string{"--binary", notELF}, "nothing to write"},
		{[]string{"--binary", notELF, "--out", out}, "not a Linux executable"},
		{[]string{"--binary", filepath.Join(dir, "missing"), "--out", out}, "--binary"},
		{[]string{"--binary", notELF, "--out", out, "--version", "1.0 beta"}, "image tag"},
		{[]string{"--binary", notELF, "--out", out, "extra"}, "unexpected arguments"},
	}
	// A dynamically linked executable: the system's own programs are.
	for _, p := range []string{"/bin/true", "/usr/bin/true"} {
		if f, err := elf.Open(p); err == nil {
			if !isStatic(f) {
				cases = append(cases, struct {
					args []string
					want string
				}{[]string{"--binary", p, "--out", out}, "dynamically linked"})
			}
			f.Close()
			break
		}
	}
	for _, c := range cases {
		var stdout, stderr bytes.Buffer
		err := run(c.args, &stdout, &stderr)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run %q: %v, want an error saying %q", c.args, err, c.want)
		}
	}
	if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused build left %s: %v", out, err)
	}
	var stdout, stderr bytes.Buffer
	if err := run([]string{"--help"}, &stdout, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("--help: %v", err)
	}
	for _, want := range []string{"Usage: chatd-image --binary PATH", "docker load", "CHATD_AUTH_SECRET", "-oci-layout", "SOURCE_DATE_EPOCH"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("--help does not say %q:\n%s", want, stderr.String())
		}
	}
}

// service is what the test reads of a compose service.
type service struct {
	Image       string            `yaml:"image"`
	PullPolicy  string            `yaml:"pull_policy"`
	Hostname    string            `yaml:"hostname"`
	Environment map[string]string `yaml:"environment"`
	Ports       []string          `yaml:"ports"`
	Volumes     []string          `yaml:"volumes"`
	ReadOnly    bool              `yaml:"read_only"`
	Tmpfs       []string          `yaml:"tmpfs"`
	Healthcheck struct {
		Test []string `yaml:"test"`
	} `yaml:"healthcheck"`
}

// composeFile is what the test reads of a compose file.
type composeFile struct {
	Services map[string]service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
}

// interpRE finds compose's interpolations: $$, ${VAR}, ${VAR:?err},
// ${VAR?err}, ${VAR:-default}, ${VAR-default}, $VAR.
var interpRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)`)

// interpolate does what compose does to s with the variables vars, and
// returns the names of the variables s requires (${VAR:?...}).
func interpolate(s string, vars map[string]string) (string, []string, error) {
	var required []string
	var err error
	out := interpRE.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		sm := interpRE.FindStringSubmatch(m)
		name, op, arg := sm[1], sm[2], sm[3]
		if name == "" {
			name = sm[4]
		}
		v, set := vars[name]
		switch op {
		case ":?", "?":
			required = append(required, name)
			if !set || (op == ":?" && v == "") {
				err = fmt.Errorf("required variable %s is missing: %s", name, arg)
			}
		case ":-":
			if v == "" {
				return arg
			}
		case "-":
			if !set {
				return arg
			}
		}
		return v
	})
	return out, required, err
}

// readCompose reads a compose file with vars as its environment.
func readCompose(t *testing.T, file string, vars map[string]string) (composeFile, []string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	// Interpolation applies to values, never to comments: drop them by
	// decoding first, then interpolate the environment's values.
	var cf composeFile
	if err := yaml.Unmarshal(b, &cf); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	var required []string
	for name, s := range cf.Services {
		for k, v := range s.Environment {
			iv, req, err := interpolate(v, vars)
			if err != nil {
				t.Fatalf("%s: service %s: %s: %v", file, name, k, err)
			}
			s.Environment[k] = iv
			for _, r := range req {
				if !slices.Contains(required, r) {
					required = append(required, r)
				}
			}
		}
	}
	slices.Sort(required)
	return cf, required
}

// imageHealthcheck is the image's HEALTHCHECK test, which the compose
// files restate.
var imageHealthcheck = []string{"CMD", "/chatd", "probe", "--http", "127.0.0.1:8080"}

// checkChatdService checks what every chatd service must be: the loaded
// image, never pulled, its ports published on loopback only, its data in
// a named volume, the image's health check.
func checkChatdService(t *testing.T, file, name string, s service, volumes map[string]any) {
	t.Helper()
	if s.Image != "chatd:latest" || s.PullPolicy != "never" {
		t.Errorf("%s: %s: image %q, pull_policy %q; want chatd:latest, never", file, name, s.Image, s.PullPolicy)
	}
	var containerPorts []string
	for _, p := range s.Ports {
		parts := strings.Split(p, ":")
		if len(parts) != 3 || parts[0] != "127.0.0.1" {
			t.Errorf("%s: %s: port %q is not published on 127.0.0.1 alone", file, name, p)
			continue
		}
		containerPorts = append(containerPorts, parts[2]+"/tcp")
	}
	slices.Sort(containerPorts)
	if !slices.Equal(containerPorts, []string{"1883/tcp", "8080/tcp", "8083/tcp"}) {
		t.Errorf("%s: %s: publishes %q, want the image's 1883, 8080, 8083", file, name, containerPorts)
	}
	dataVolume := ""
	for _, v := range s.Volumes {
		if src, dst, ok := strings.Cut(v, ":"); ok && dst == "/var/lib/chatd" {
			dataVolume = src
		}
	}
	if _, ok := volumes[dataVolume]; !ok || dataVolume == "" {
		t.Errorf("%s: %s: /var/lib/chatd is not a named volume (volumes %q)", file, name, s.Volumes)
	}
	if !slices.Equal(s.Healthcheck.Test, imageHealthcheck) {
		t.Errorf("%s: %s: healthcheck %q, want %q", file, name, s.Healthcheck.Test, imageHealthcheck)
	}
	if !s.ReadOnly || !slices.Contains(s.Tmpfs, "/tmp") {
		t.Errorf("%s: %s: want a read-only root with a tmpfs /tmp", file, name)
	}
}

// loadServiceConfig loads the image's configuration with the service's
// environment, as the container would, with the data in a temporary
// directory.
func loadServiceConfig(t *testing.T, confFile string, env map[string]string) (config.Config, error) {
	t.Helper()
	clearChatdEnv(t)
	for k, v := range env {
		t.Setenv(k, v)
	}
	t.Setenv("CHATD_DATA_DIR", t.TempDir())
	return config.Load(confFile, nil)
}

// checkMounts fails t for each bind mount of file's services whose source
// is not in the repository.
func checkMounts(t *testing.T, file string, cf composeFile) {
	t.Helper()
	for name, s := range cf.Services {
		for _, v := range s.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if !strings.HasPrefix(src, ".") && !strings.HasPrefix(src, "/") {
				if _, ok := cf.Volumes[src]; !ok {
					t.Errorf("%s: %s: volume %s is not declared", file, name, src)
				}
				continue
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(file), src)); err != nil {
				t.Errorf("%s: %s mounts %s, missing from the repository: %v", file, name, src, err)
			}
		}
	}
}

// mountOf returns the container path that service s mounts src
// (relative to the compose directory) at, or "".
func mountOf(s service, src string) string {
	for _, v := range s.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) >= 2 && path.Clean(parts[0]) == path.Clean(src) {
			return parts[1]
		}
	}
	return ""
}

// TestCompose checks the compose files against the image and the
// repository: the services, each chatd node's environment loaded as chatd
// would with the image's configuration, the files mounted, Prometheus'
// scrape job and rules, and Grafana's provisioning of the dashboards.
func TestCompose(t *testing.T) {
	confFile := filepath.Join(t.TempDir(), "chatd.yaml")
	if err := os.WriteFile(confFile, []byte(configYAML), 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("single", func(t *testing.T) {
		cf, required := readCompose(t, singleCompose, composeVars)
		if !slices.Equal(required, []string{"CHATD_AUTH_SECRET"}) {
			t.Errorf("required variables %q, want CHATD_AUTH_SECRET", required)
		}
		if len(cf.Services) != 1 {
			t.Fatalf("services %q, want one", slices.Sorted(maps.Keys(cf.Services)))
		}
		s, ok := cf.Services["chatd"]
		if !ok {
			t.Fatalf("no service chatd: %q", slices.Sorted(maps.Keys(cf.Services)))
		}
		checkChatdService(t, singleCompose, "chatd", s, cf.Volumes)
		checkMounts(t, singleCompose, cf)
		cfg, err := loadServiceConfig(t, confFile, s.Environment)
		if err != nil {
			t.Fatalf("the service's configuration does not load: %v", err)
		}
		if cfg.Auth.Secret != composeVars["CHATD_AUTH_SECRET"] || cfg.Cluster.Enabled {
			t.Errorf("auth.secret %q, cluster %v", cfg.Auth.Secret, cfg.Cluster.Enabled)
		}
		b, _ := os.ReadFile(singleCompose)
		if _, _, err := interpolate(string(b), map[string]string{}); err == nil || !strings.Contains(err.Error(), "CHATD_AUTH_SECRET") {
			t.Errorf("without CHATD_AUTH_SECRET: %v, want compose to refuse", err)
		}
	})

	t.Run("cluster", func(t *testing.T) {
		cf, required := readCompose(t, clusterCompose, composeVars)
		if !slices.Equal(required, []string{"CHATD_AUTH_SECRET", "CHATD_CLUSTER_PASSWORD"}) {
			t.Errorf("required variables %q, want CHATD_AUTH_SECRET and CHATD_CLUSTER_PASSWORD", required)
		}
		checkMounts(t, clusterCompose, cf)
		chatds := []string{"chatd1", "chatd2", "chatd3"}
		if got := slices.Sorted(maps.Keys(cf.Services)); !slices.Equal(got, append(slices.Clone(chatds), "grafana", "prometheus")) {
			t.Fatalf("services %q, want chatd1..3, prometheus, grafana", got)
		}
		nodes := map[string]bool{}
		hostPorts := map[string]string{}
		for _, name := range chatds {
			s := cf.Services[name]
			checkChatdService(t, clusterCompose, name, s, cf.Volumes)
			for _, p := range s.Ports {
				if other, dup := hostPorts[p[:strings.LastIndex(p, ":")]]; dup {
					t.Errorf("%s and %s publish the same host port: %s", other, name, p)
				}
				hostPorts[p[:strings.LastIndex(p, ":")]] = name
			}
			cfg, err := loadServiceConfig(t, confFile, s.Environment)
			if err != nil {
				t.Fatalf("%s: its configuration does not load: %v", name, err)
			}
			c := cfg.Cluster
			if !c.Enabled || c.Name == "" || c.Password != composeVars["CHATD_CLUSTER_PASSWORD"] || c.Replicas != 3 {
				t.Errorf("%s: cluster %+v: want enabled, named, the password, 3 replicas", name, c)
			}
			if nodes[c.Node] {
				t.Errorf("%s: node name %q taken by another node", name, c.Node)
			}
			nodes[c.Node] = true
			if s.Hostname != name {
				t.Errorf("%s: hostname %q", name, s.Hostname)
			}
			var routes []string
			for _, peer := range chatds {
				routes = append(routes, "nats://"+peer+":6222")
			}
			if c.Routes != strings.Join(routes, ",") || !strings.HasSuffix(c.Listen, ":6222") {
				t.Errorf("%s: routes %q on %q, want every node's port 6222", name, c.Routes, c.Listen)
			}
			// Its routes listen beyond loopback: without the password
			// chatd refuses to start, as the compose file tells.
			env := maps.Clone(s.Environment)
			delete(env, "CHATD_CLUSTER_PASSWORD")
			if _, err := loadServiceConfig(t, confFile, env); err == nil || !strings.Contains(err.Error(), "cluster.password") {
				t.Errorf("%s without CHATD_CLUSTER_PASSWORD: %v, want chatd to refuse", name, err)
			}
		}

		// Prometheus scrapes the three nodes as the job the alert rules
		// expect, and loads them.
		prom := cf.Services["prometheus"]
		promConf := mountOf(prom, "./prometheus.yml")
		rules := mountOf(prom, "../prometheus/alerts.yml")
		if promConf != "/etc/prometheus/prometheus.yml" || rules == "" {
			t.Fatalf("prometheus mounts %q: want prometheus.yml as /etc/prometheus/prometheus.yml and the alert rules", prom.Volumes)
		}
		var pc struct {
			RuleFiles     []string `yaml:"rule_files"`
			ScrapeConfigs []struct {
				JobName       string `yaml:"job_name"`
				MetricsPath   string `yaml:"metrics_path"`
				StaticConfigs []struct {
					Targets []string `yaml:"targets"`
				} `yaml:"static_configs"`
			} `yaml:"scrape_configs"`
		}
		readYAML(t, filepath.Join(composeDir, "prometheus.yml"), &pc)
		if len(pc.ScrapeConfigs) != 1 || pc.ScrapeConfigs[0].JobName != "chatd" || len(pc.ScrapeConfigs[0].StaticConfigs) != 1 {
			t.Fatalf("scrape configs %+v, want the one job chatd", pc.ScrapeConfigs)
		}
		if mp := pc.ScrapeConfigs[0].MetricsPath; mp != "" && mp != "/metrics" {
			t.Errorf("metrics_path %q", mp)
		}
		var wantTargets []string
		for _, n := range chatds {
			wantTargets = append(wantTargets, n+":8080")
		}
		if got := pc.ScrapeConfigs[0].StaticConfigs[0].Targets; !slices.Equal(got, wantTargets) {
			t.Errorf("targets %q, want %q", got, wantTargets)
		}
		loaded := false
		for _, g := range pc.RuleFiles {
			if !path.IsAbs(g) {
				g = path.Join(path.Dir(promConf), g)
			}
			if ok, _ := path.Match(g, rules); ok {
				loaded = true
			}
		}
		if !loaded {
			t.Errorf("rule_files %q do not load the alert rules, mounted at %s", pc.RuleFiles, rules)
		}
		var alerts struct {
			Groups []struct {
				Rules []struct {
					Expr string `yaml:"expr"`
				} `yaml:"rules"`
			} `yaml:"groups"`
		}
		readYAML(t, filepath.Join(root, "deploy", "prometheus", "alerts.yml"), &alerts)
		for _, g := range alerts.Groups {
			for _, r := range g.Rules {
				if m := regexp.MustCompile(`job="([^"]*)"`).FindStringSubmatch(r.Expr); m != nil && m[1] != "chatd" {
					t.Errorf("an alert rule selects job %q, the scrape job is chatd: %s", m[1], r.Expr)
				}
			}
		}
		if promtool, err := exec.LookPath("promtool"); err == nil {
			// The files laid out as the container sees them, so that
			// promtool loads the rules through rule_files too.
			etc := t.TempDir()
			for src, dst := range map[string]string{"prometheus.yml": promConf, "../prometheus/alerts.yml": rules} {
				rel, err := filepath.Rel(path.Dir(promConf), dst)
				if err != nil || strings.HasPrefix(rel, "..") {
					t.Fatalf("%s is mounted outside %s", dst, path.Dir(promConf))
				}
				b, err := os.ReadFile(filepath.Join(composeDir, src))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Dir(filepath.Join(etc, rel)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(etc, rel), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			out, err := exec.Command(promtool, "check", "config", filepath.Join(etc, "prometheus.yml")).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "chatd-alerts.yml") {
				t.Errorf("promtool check config with the alert rules: %v\n%s", err, out)
			}
		}

		// Grafana: a default Prometheus data source, the service's, and
		// the dashboards of deploy/grafana provisioned from their mount.
		graf := cf.Services["grafana"]
		dsDir := mountOf(graf, "./grafana/datasources")
		dbDir := mountOf(graf, "./grafana/dashboards")
		dashboards := mountOf(graf, "../grafana")
		if dsDir != "/etc/grafana/provisioning/datasources" || dbDir != "/etc/grafana/provisioning/dashboards" || dashboards == "" {
			t.Fatalf("grafana mounts %q: want the provisioning of datasources and dashboards, and deploy/grafana", graf.Volumes)
		}
		var ds struct {
			APIVersion  int `yaml:"apiVersion"`
			Datasources []struct {
				Name      string `yaml:"name"`
				UID       string `yaml:"uid"`
				Type      string `yaml:"type"`
				URL       string `yaml:"url"`
				IsDefault bool   `yaml:"isDefault"`
			} `yaml:"datasources"`
		}
		readYAML(t, filepath.Join(composeDir, "grafana", "datasources", "prometheus.yml"), &ds)
		if ds.APIVersion != 1 || len(ds.Datasources) != 1 {
			t.Fatalf("datasources %+v", ds)
		}
		d := ds.Datasources[0]
		if d.Type != "prometheus" || !d.IsDefault || d.URL != "http://prometheus:9090" || d.UID == "" {
			t.Errorf("datasource %+v: want the default, of type prometheus, at http://prometheus:9090", d)
		}
		var prov struct {
			APIVersion int `yaml:"apiVersion"`
			Providers  []struct {
				Type    string `yaml:"type"`
				Options struct {
					Path string `yaml:"path"`
				} `yaml:"options"`
			} `yaml:"providers"`
		}
		readYAML(t, filepath.Join(composeDir, "grafana", "dashboards", "chatd.yml"), &prov)
		if prov.APIVersion != 1 || len(prov.Providers) != 1 || prov.Providers[0].Type != "file" || prov.Providers[0].Options.Path != dashboards {
			t.Errorf("dashboard providers %+v, want one of type file reading %s", prov.Providers, dashboards)
		}
		checkDashboards(t, d.Type)
	})
}

// dsRefRE finds the data source references of a dashboard: ${NAME} or
// $NAME in a datasource's uid.
var dsRefRE = regexp.MustCompile(`^\$\{?([A-Za-z0-9_]+)\}?$`)

// checkDashboards fails t unless every data source a dashboard of
// deploy/grafana refers to by a variable resolves without an import: a
// provisioned dashboard's __inputs are not filled in, so each ${DS_...}
// must be a data source variable of the dashboard, of type dsType, which
// Grafana sets to the default data source of that type.
func checkDashboards(t *testing.T, dsType string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(root, "deploy", "grafana", "*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no dashboards in deploy/grafana: %v", err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var db struct {
			UID        string `json:"uid"`
			Templating struct {
				List []struct {
					Name  string `json:"name"`
					Type  string `json:"type"`
					Query any    `json:"query"`
				} `json:"list"`
			} `json:"templating"`
		}
		if err := json.Unmarshal(b, &db); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if db.UID == "" {
			t.Errorf("%s: no uid: a provisioned dashboard needs one to keep its URL", f)
		}
		vars := map[string]bool{}
		for _, v := range db.Templating.List {
			if v.Type == "datasource" && v.Query == dsType {
				vars[v.Name] = true
			}
		}
		var doc any
		if err := json.Unmarshal(b, &doc); err != nil {
			t.Fatal(err)
		}
		refs := 0
		walkDatasources(doc, func(uid string) {
			if m := dsRefRE.FindStringSubmatch(uid); m != nil {
				refs++
				if !vars[m[1]] {
					t.Errorf("%s: data source ${%s} is no %s data source variable of the dashboard: it would not resolve when provisioned", f, m[1], dsType)
				}
			}
		})
		if refs == 0 {
			t.Errorf("%s: no panel refers to a data source variable", f)
		}
	}
}

// walkDatasources calls f with the uid of every "datasource" object in v.
func walkDatasources(v any, f func(uid string)) {
	switch v := v.(type) {
	case map[string]any:
		for k, c := range v {
			if k == "datasource" {
				switch ds := c.(type) {
				case map[string]any:
					if uid, ok := ds["uid"].(string); ok {
						f(uid)
					}
				case string:
					f(ds)
				}
			}
			walkDatasources(c, f)
		}
	case []any:
		for _, c := range v {
			walkDatasources(c, f)
		}
	}
}

// readYAML decodes file into v.
func readYAML(t *testing.T, file string, v any) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

// containerRuntime returns a container engine that can run the image
// here, the global flags it needs and the flags of its run command, or
// skips t saying why there is none.
func containerRuntime(t *testing.T) (engine string, global, runFlags []string) {
	t.Helper()
	var tried []string
	for _, e := range []string{"docker", "podman"} {
		p, err := exec.LookPath(e)
		if err != nil {
			tried = append(tried, e+": not installed")
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err := exec.CommandContext(ctx, p, "info").CombinedOutput()
		cancel()
		if err != nil {
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			tried = append(tried, fmt.Sprintf("%s info: %v: %s", e, err, strings.TrimSpace(lines[len(lines)-1])))
			continue
		}
		if e == "podman" {
			// Podman raises the container's nofile and nproc limits to
			// their maximum, which fails where the engine lacks
			// CAP_SYS_RESOURCE (this project's machines): ask for less.
			runFlags = []string{"--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"}
			// crun, podman's default runtime, refuses hosts with hybrid
			// cgroups (v1 controllers and v2 mounted); runc runs there.
			if _, err := exec.LookPath("runc"); err == nil {
				global = []string{"--runtime", "runc"}
			}
		}
		return p, global, runFlags
	}
	t.Skipf("no container engine runs here, so the image is checked as files only (%s)", strings.Join(tried, "; "))
	return "", nil, nil
}

// runContainer loads the image into a container engine, starts it with no
// network but its own loopback, and checks that it becomes ready by the
// image's own health check, that it runs as chatd, that `chatd token`
// works in it as documented, and that it stops gracefully.
func runContainer(t *testing.T, img v1.Image) {
	engine, global, runFlags := containerRuntime(t)
	rt := func(args ...string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		return exec.CommandContext(ctx, engine, append(slices.Clone(global), args...)...).CombinedOutput()
	}
	// The image built, under a name of the test's own, so that the
	// user's chatd:latest is never replaced; its layer is copied as it is,
	// not compressed again.
	image := fmt.Sprintf("chatd-imagetest:run-%d", os.Getpid())
	tag, err := name.NewTag(image)
	if err != nil {
		t.Fatal(err)
	}
	tarPath := filepath.Join(t.TempDir(), "image.tar")
	if err := writeTarball(tarPath, img, []name.Tag{tag}); err != nil {
		t.Fatal(err)
	}
	if out, err := rt("load", "-i", tarPath); err != nil {
		t.Fatalf("%s load: %v\n%s", engine, err, out)
	}
	t.Cleanup(func() { rt("rmi", "-f", image) })

	name := fmt.Sprintf("chatd-imagetest-%d", os.Getpid())
	secret := composeVars["CHATD_AUTH_SECRET"]
	args := append([]string{"run", "-d", "--name", name, "--network", "none", "-e", "CHATD_AUTH_SECRET=" + secret}, runFlags...)
	if out, err := rt(append(args, image)...); err != nil {
		t.Fatalf("%s run: %v\n%s", engine, err, out)
	}
	t.Cleanup(func() { rt("rm", "-f", "-v", name) })
	logs := func() string { out, _ := rt("logs", name); return string(out) }

	// What the image's HEALTHCHECK runs, in the container: GET /readyz.
	start := time.Now()
	testutil.EventuallyNoError(t, 30*time.Second, func() error {
		out, err := rt("exec", name, "/chatd", "probe", "--http", "127.0.0.1:8080")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if !strings.Contains(string(out), `"ready":true`) {
			return fmt.Errorf("probe said %s", out)
		}
		return nil
	}, "the container's /readyz (logs:\n%s)", logs())
	t.Logf("%s: the container was ready after %v", engine, time.Since(start).Round(time.Millisecond))
	out, err := rt("inspect", "--format", "{{json .Config.Healthcheck}}", name)
	if err != nil || !strings.Contains(string(out), `"/chatd","probe"`) {
		t.Errorf("the container's health check: %v: %s", err, out)
	}
	if strings.HasSuffix(engine, "podman") {
		// The image's own HEALTHCHECK, run once now.
		if out, err := rt("healthcheck", "run", name); err != nil {
			t.Errorf("podman healthcheck run: %v: %s", err, out)
		}
	}
	if out, err := rt("inspect", "--format", "{{.State.Pid}}", name); err == nil {
		status, err := os.ReadFile("/proc/" + strings.TrimSpace(string(out)) + "/status")
		if err == nil && !regexp.MustCompile(`(?m)^Uid:\s+65532\s`).Match(status) {
			t.Errorf("the server does not run as 65532:\n%s", status)
		}
	}
	tok, err := rt("exec", name, "/chatd", "token", "alice", "--config", "/etc/chatd/chatd.yaml")
	if err != nil || strings.Count(strings.TrimSpace(string(tok)), ".") != 2 {
		t.Errorf("chatd token in the container: %v: %s", err, tok)
	}
	if out, err := rt("stop", "-t", "20", name); err != nil {
		t.Errorf("%s stop: %v: %s", engine, err, out)
	}
	if l := logs(); !strings.Contains(l, "chatd stopped") {
		t.Errorf("chatd did not stop gracefully on SIGTERM:\n%s", l)
	}
}
