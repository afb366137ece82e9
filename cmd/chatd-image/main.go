// Command chatd-image builds the container image of chatd from a static
// chatd binary, with the go-containerregistry library and no base image:
// one layer holding /chatd, the configuration /etc/chatd/chatd.yaml, the
// data directory /var/lib/chatd (owned by the user chatd, 65532), /tmp,
// and /etc/passwd and /etc/group naming that user. The image runs as
// 65532:65532, serves MQTT on 1883, HTTP on 8080 and MQTT over WebSocket
// on 8083, keeps its data in the volume /var/lib/chatd, and checks its
// health with `chatd probe`. It writes a tarball that `docker load`
// reads, an OCI image layout, or both, and prints what it wrote.
//
//	CGO_ENABLED=0 go build -trimpath -o bin/chatd-static ./cmd/chatd
//	go run ./cmd/chatd-image --binary bin/chatd-static --out bin/chatd-image.tar   # make image does both
//	docker load -i bin/chatd-image.tar
package main

import (
	"archive/tar"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/chatd/chatd/internal/release"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// The user the server runs as: the number distroless images use for
// "nonroot", so that volume permissions carry over between such images.
const (
	uid      = 65532
	gid      = 65532
	userName = "chatd"
)

// Paths inside the image.
const (
	binaryPath = "/chatd"
	configPath = "/etc/chatd/chatd.yaml"
	dataDir    = "/var/lib/chatd"
)

// The ports the image exposes: MQTT, HTTP (health, metrics, API) and MQTT
// over WebSocket, as configYAML sets them.
const (
	mqttPort      = "1883/tcp"
	httpPort      = "8080/tcp"
	websocketPort = "8083/tcp"
)

// Labels of the image (org.opencontainers.image.*).
const (
	title       = "chatd"
	description = "chatd, a durable MQTT chat server: messages on disk before their PUBACK, queued while a recipient is offline, deleted once every device has them"
	source      = "https://github.com/chatd/chatd"
)

// defaultRepository is the image name the tarball's tags are given.
const defaultRepository = "chatd"

// fallbackVersion is the version when neither --version nor git describe
// gives one.
const fallbackVersion = "dev"

// configYAML is /etc/chatd/chatd.yaml in the image: every listener on all
// the container's addresses and the data in the volume. Anything else
// comes from CHATD_* environment variables, which win over the file.
const configYAML = `# /etc/chatd/chatd.yaml in the chatd container image.
#
# Every other setting, its default and its environment variable:
#   docker run --rm chatd:latest serve --help
# Set them as CHATD_* environment variables (CHATD_QUEUE_SYNC=always, ...):
# they win over this file. Or mount your own file over this one.
#
# auth.secret is not here: give it as CHATD_AUTH_SECRET (at least 32
# bytes: openssl rand -hex 32), from your orchestrator's secrets. Without
# it chatd signs tokens with a development secret it keeps in data_dir.

# The durable queue and the media: the volume /var/lib/chatd.
data_dir: /var/lib/chatd

# MQTT over TCP.
listen: 0.0.0.0:1883

# /healthz, /readyz, /metrics and the HTTP API. Publish it only where
# operators and your app's backend reach it.
http: 0.0.0.0:8080

# MQTT over WebSocket (path /mqtt), for browsers.
websocket:
  listen: 0.0.0.0:8083
`

// passwd and group name root and the user chatd, so that the process's
// user has a name (ps, whoami, the logs of tools that look it up).
const (
	passwd = "root:x:0:0:root:/root:/sbin/nologin\n" +
		"chatd:x:65532:65532:chatd:/var/lib/chatd:/sbin/nologin\n"
	group = "root:x:0:\n" +
		"chatd:x:65532:\n"
)

// healthcheck is the image's HEALTHCHECK: GET /readyz on the HTTP listener,
// with the binary itself, since the image has no shell or HTTP client. A
// cluster node reports unready until it has a quorum: StartPeriod leaves it
// time to find its peers.
var healthcheck = v1.HealthConfig{
	Test:        []string{"CMD", binaryPath, "probe", "--http", "127.0.0.1:8080"},
	Interval:    15 * time.Second,
	Timeout:     10 * time.Second, // probe gives up after 5s by itself
	StartPeriod: time.Minute,
	Retries:     3,
}

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return
	case err != nil:
		fmt.Fprintln(os.Stderr, "chatd-image:", err)
		os.Exit(1)
	}
}

// options are the settings of one build.
type options struct {
	binary     string    // the static chatd executable
	version    string    // the image's version: its tag and label
	arch       string    // GOARCH of the binary and the image's platform
	out        string    // docker-loadable tarball to write, or ""
	ociLayout  string    // OCI image layout directory to write, or ""
	repository string    // the image name of the tarball's tags
	revision   string    // the commit of the label, or "" to read it from the binary
	licenses   string    // the licenses label, an SPDX expression
	created    time.Time // the time stamp of the files, the config and the history
}

// run parses the command line, builds the image, writes it and prints
// what it wrote on stdout; usage and flag errors go to stderr.
func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatd-image", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.binary, "binary", "", "the chatd executable to put in the image (required): static, built with CGO_ENABLED=0 -trimpath")
	fs.StringVar(&o.version, "version", "", "the image's version, its tag and its version label (a leading v is dropped); default: from git describe --tags --always --dirty, or "+fallbackVersion)
	fs.StringVar(&o.arch, "arch", runtime.GOARCH, "architecture of the binary and the image, as GOARCH (amd64, arm64, ...)")
	fs.StringVar(&o.out, "out", "", "write a tarball that docker load (or podman load) reads, tagged REPOSITORY:VERSION and REPOSITORY:latest")
	fs.StringVar(&o.ociLayout, "oci-layout", "", "write an OCI image layout into this directory (created if missing; an existing layout gets the image added)")
	fs.StringVar(&o.repository, "repository", defaultRepository, "image name of the tarball's tags")
	fs.StringVar(&o.revision, "revision", "", "commit of the revision label; default: the vcs.revision the binary records, or git rev-parse HEAD")
	fs.StringVar(&o.licenses, "licenses", "NOASSERTION", "the licenses label, an SPDX license expression")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: chatd-image --binary PATH (--out FILE | --oci-layout DIR) [flags]

Builds the container image of chatd with the go-containerregistry library,
pulling no base image: one layer with /chatd, /etc/chatd/chatd.yaml (every
listener on 0.0.0.0, data in /var/lib/chatd), the empty data directory
/var/lib/chatd owned by the user chatd (65532), /tmp, /etc/passwd and
/etc/group. It runs "/chatd serve --config /etc/chatd/chatd.yaml" as
65532:65532, exposes 1883 (MQTT), 8080 (HTTP) and 8083 (MQTT over
WebSocket), declares the volume /var/lib/chatd, and checks its health with
"/chatd probe". Give auth.secret as CHATD_AUTH_SECRET when you run it.
Prints each file or directory it wrote.

  CGO_ENABLED=0 go build -trimpath -o bin/chatd-static ./cmd/chatd
  chatd-image --binary bin/chatd-static --out bin/chatd-image.tar   # make image does both
  docker load -i bin/chatd-image.tar
  docker run -d -e CHATD_AUTH_SECRET=$(openssl rand -hex 32) -p 127.0.0.1:1883:1883 \
    -p 127.0.0.1:8080:8080 -v chatd-data:/var/lib/chatd chatd:latest

SOURCE_DATE_EPOCH, when set, fixes the time stamps for a reproducible image.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.binary == "" {
		fs.Usage()
		return errors.New("--binary is required")
	}
	if o.out == "" && o.ociLayout == "" {
		fs.Usage()
		return errors.New("nothing to write: give --out, --oci-layout or both")
	}
	if o.version == "" {
		o.version = gitVersion()
	}
	created, err := sourceDate()
	if err != nil {
		return err
	}
	o.created = created
	img, tags, err := build(o)
	if err != nil {
		return err
	}
	if o.out != "" {
		if err := writeTarball(o.out, img, tags); err != nil {
			return err
		}
		names := make([]string, len(tags))
		for i, t := range tags {
			names[i] = t.String()
		}
		if _, err := fmt.Fprintf(stdout, "%s (docker load -i %s: %s)\n", o.out, o.out, strings.Join(names, ", ")); err != nil {
			return err
		}
	}
	if o.ociLayout != "" {
		if err := writeLayout(o.ociLayout, img, tags[0]); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(stdout, "%s (OCI image layout: %s)\n", o.ociLayout, tags[0]); err != nil {
			return err
		}
	}
	return nil
}

// build returns the image described by o and the tags it is to be known by,
// REPOSITORY:VERSION first, then REPOSITORY:latest.
func build(o options) (v1.Image, []name.Tag, error) {
	version := imageVersion(o.version)
	var tags []name.Tag
	for _, t := range []string{version, "latest"} {
		tag, err := name.NewTag(o.repository + ":" + t)
		if err != nil {
			return nil, nil, fmt.Errorf("--repository %q and --version %q do not make an image tag: %w", o.repository, version, err)
		}
		tags = append(tags, tag)
	}
	bin, err := os.ReadFile(o.binary)
	if err != nil {
		return nil, nil, fmt.Errorf("--binary: %w", err)
	}
	if err := checkBinary(o.binary, bin, o.arch); err != nil {
		return nil, nil, err
	}
	revision := o.revision
	if revision == "" {
		revision = binaryRevision(o.binary)
	}
	if revision == "" {
		revision = gitRevision()
	}
	layerTar, err := rootfs(bin, o.created)
	if err != nil {
		return nil, nil, fmt.Errorf("build the layer: %w", err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("compress the layer: %w", err)
	}
	// empty.Image has Docker's schema 2 media types, kept on purpose: the
	// OCI image config has no Healthcheck, and podman and buildah drop it
	// from an OCI-typed image; Docker, containerd and every registry take
	// either.
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Author:    source,
			Created:   v1.Time{Time: o.created},
			CreatedBy: "chatd-image --binary " + filepath.Base(o.binary),
			Comment:   "chatd " + version + ", its configuration, its user and its data directory",
		},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("add the layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, nil, fmt.Errorf("read the image config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = o.arch
	cf.OS = "linux"
	cf.Author = source
	cf.Created = v1.Time{Time: o.created}
	labels := map[string]string{
		"org.opencontainers.image.title":       title,
		"org.opencontainers.image.description": description,
		"org.opencontainers.image.source":      source,
		"org.opencontainers.image.version":     version,
		"org.opencontainers.image.licenses":    o.licenses,
		"org.opencontainers.image.created":     o.created.UTC().Format(time.RFC3339),
	}
	if revision != "" {
		labels["org.opencontainers.image.revision"] = revision
	}
	hc := healthcheck
	cf.Config = v1.Config{
		User:       strconv.Itoa(uid) + ":" + strconv.Itoa(gid),
		Entrypoint: []string{binaryPath},
		Cmd:        []string{"serve", "--config", configPath},
		WorkingDir: dataDir,
		Env:        []string{"PATH=/"},
		ExposedPorts: map[string]struct{}{
			mqttPort: {}, httpPort: {}, websocketPort: {},
		},
		Volumes:     map[string]struct{}{dataDir: {}},
		Labels:      labels,
		Healthcheck: &hc,
		// chatd shuts down gracefully on SIGTERM (the runtime's default).
		StopSignal: "SIGTERM",
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, nil, fmt.Errorf("set the image config: %w", err)
	}
	return img, tags, nil
}

// entry is one file or directory of the layer.
type entry struct {
	name     string // path without the leading slash
	mode     int64
	uid, gid int
	body     []byte // nil for a directory
}

// rootfs returns the uncompressed tar of the image's one layer.
func rootfs(bin []byte, mtime time.Time) ([]byte, error) {
	entries := []entry{
		{name: "chatd", mode: 0o755, body: bin},
		{name: "etc/", mode: 0o755},
		{name: "etc/chatd/", mode: 0o755},
		{name: "etc/chatd/chatd.yaml", mode: 0o644, body: []byte(configYAML)},
		{name: "etc/group", mode: 0o644, body: []byte(group)},
		{name: "etc/passwd", mode: 0o644, body: []byte(passwd)},
		{name: "tmp/", mode: 0o1777},
		{name: "var/", mode: 0o755},
		{name: "var/lib/", mode: 0o755},
		// A named volume mounted here starts as a copy of this directory:
		// owned by chatd, so the server can write it.
		{name: "var/lib/chatd/", mode: 0o750, uid: uid, gid: gid},
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			Uid:     e.uid,
			Gid:     e.gid,
			Uname:   "root",
			Gname:   "root",
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		if e.uid == uid {
			h.Uname, h.Gname = userName, userName
		}
		if e.body == nil {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeTarball writes img to path as a tarball that docker load reads,
// known by every tag in tags. It is written beside its final name and
// renamed, so that a failed build leaves no truncated tarball behind.
func writeTarball(path string, img v1.Image, tags []name.Tag) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("--out directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".chatd-image-*")
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name()) // a no-op once renamed
	refs := make(map[name.Reference]v1.Image, len(tags))
	for _, t := range tags {
		refs[t] = img
	}
	if err := tarball.MultiRefWriteToFile(tmp.Name(), refs); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// writeLayout adds img to the OCI image layout in dir, made if missing,
// with tag as its reference name (org.opencontainers.image.ref.name).
func writeLayout(dir string, img v1.Image, tag name.Tag) error {
	p, err := layout.FromPath(dir)
	if err != nil {
		if p, err = layout.Write(dir, empty.Index); err != nil {
			return fmt.Errorf("--oci-layout %s: %w", dir, err)
		}
	}
	err = p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag.TagStr(),
	}))
	if err != nil {
		return fmt.Errorf("--oci-layout %s: %w", dir, err)
	}
	return nil
}

// checkBinary refuses what cannot run in an image without a libc: anything
// but a Linux executable for arch, statically linked.
func checkBinary(path string, bin []byte, arch string) error {
	if _, ok := release.ELFMachines[arch]; !ok {
		return fmt.Errorf("--arch %q is not one chatd is built for (amd64, arm64, ...)", arch)
	}
	f, err := release.Executable(path, bytes.NewReader(bin), arch)
	if err != nil {
		return err
	}
	defer f.Close()
	if !isStatic(f) {
		return fmt.Errorf("--binary %s is dynamically linked, and the image has no libc: build it with CGO_ENABLED=0 go build -trimpath", path)
	}
	return nil
}

// isStatic reports whether f needs no dynamic loader: no PT_INTERP
// program header and no dynamic section.
func isStatic(f *elf.File) bool {
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			return false
		}
	}
	return f.Section(".dynamic") == nil && f.Section(".interp") == nil
}

// binaryRevision returns the commit the Go toolchain recorded in the
// binary (vcs.revision, with "-dirty" when the tree had changes), or "".
func binaryRevision(path string) string {
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return ""
	}
	var rev string
	dirty := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev != "" && dirty {
		rev += "-dirty"
	}
	return rev
}

// imageVersion returns v without a leading "v" before a digit: v1.2.0 is
// 1.2.0, as the Debian package names it.
func imageVersion(v string) string {
	if len(v) > 1 && v[0] == 'v' && v[1] >= '0' && v[1] <= '9' {
		return v[1:]
	}
	return v
}

// gitRevision returns the work tree's commit, or "" without git or a
// repository.
func gitRevision() string {
	out, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// gitVersion is the version of the work tree from git describe (v1.2.3,
// v1.2.3-4-gabc1234, abc1234-dirty), or fallbackVersion without git or a
// repository.
func gitVersion() string {
	if v := release.GitDescribe(); v != "" {
		return v
	}
	return fallbackVersion
}

// sourceDate returns the time stamp of the image's files and config:
// SOURCE_DATE_EPOCH when set, for reproducible builds, and now otherwise.
func sourceDate() (time.Time, error) {
	s := os.Getenv("SOURCE_DATE_EPOCH")
	if s == "" {
		return time.Now().UTC().Truncate(time.Second), nil
	}
	sec, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH %q is not a number of seconds: %w", s, err)
	}
	return time.Unix(sec, 0).UTC(), nil
}
