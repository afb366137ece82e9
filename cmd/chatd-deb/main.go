// Command chatd-deb builds the Debian package of chatd from a chatd binary,
// with the nfpm library: the binary as /usr/bin/chatd, the systemd unit
// deploy/systemd/chatd.service, the configuration deploy/debian/chatd.yaml
// as the conffile /etc/chatd/chatd.yaml, and the maintainer scripts
// deploy/debian/{postinst,prerm,postrm} (the chatd user, /var/lib/chatd).
// It prints the path of the .deb it wrote.
//
//	go build -trimpath -o bin/chatd ./cmd/chatd
//	go run ./cmd/chatd-deb --binary bin/chatd --out bin/   # make deb does both
//	dpkg -i bin/chatd_*.deb
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"

	"github.com/chatd/chatd/internal/release"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the "deb" packager
	"github.com/goreleaser/nfpm/v2/files"
)

// fallbackVersion is the package version when neither --version nor git
// describe gives one: "~" sorts it before any release.
const fallbackVersion = "0.0.0~dev"

// Package metadata written into the control file.
const (
	packageName = "chatd"
	homepage    = "https://github.com/chatd/chatd"
	description = `durable MQTT chat server
chatd is the server behind a WhatsApp-style app, spoken to over MQTT 3.1.1
or 5.0: a message is on disk before its PUBACK, waits in the recipient's
queue while their devices are offline, and is deleted once every device
has acknowledged it. Receipts, presence, typing, groups, media, push
webhooks. This package runs it as the systemd service chatd.service, as
the user chatd, with its configuration in /etc/chatd and its data in
/var/lib/chatd.`
	defaultMaintainer = "chatd maintainers <maintainers@chatd.invalid>"
)

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return
	case err != nil:
		fmt.Fprintln(os.Stderr, "chatd-deb:", err)
		os.Exit(1)
	}
}

// options are the settings of one build.
type options struct {
	binary     string // the chatd executable to package
	version    string // Debian version of the package
	arch       string // GOARCH or Debian architecture name
	outDir     string // where the .deb is written
	deployDir  string // the repository's deploy/ folder
	maintainer string // the control file's Maintainer
	compress   string // of the files in the package: gzip, xz, zstd or none
}

// run parses the command line, builds the package and prints its path on
// stdout; usage and flag errors go to stderr.
func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatd-deb", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.binary, "binary", "", "the chatd executable to package (required), e.g. bin/chatd built with -trimpath")
	fs.StringVar(&o.version, "version", "", "Debian version of the package (a leading v is dropped); default: from git describe --tags --always, or "+fallbackVersion)
	fs.StringVar(&o.arch, "arch", runtime.GOARCH, "architecture of the binary, as GOARCH (amd64, arm64, ...) or as Debian names it")
	fs.StringVar(&o.outDir, "out", "bin", "directory the .deb is written to, created if missing")
	fs.StringVar(&o.deployDir, "deploy", "deploy", "the repository's deploy/ directory: systemd/chatd.service and debian/{chatd.yaml,postinst,prerm,postrm}")
	fs.StringVar(&o.maintainer, "maintainer", defaultMaintainer, "the package's Maintainer field, \"Name <email>\"")
	fs.StringVar(&o.compress, "compression", "gzip", "compression of the package's files: gzip (any dpkg), xz, zstd (dpkg 1.21.18 or later, Debian 12) or none")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: chatd-deb --binary PATH [flags]

Builds the Debian package of chatd (with the nfpm library) and prints the
path of the .deb. It installs /usr/bin/chatd, the systemd unit
/lib/systemd/system/chatd.service and the configuration /etc/chatd/chatd.yaml
(a conffile, kept on upgrades); its maintainer scripts create the system
user chatd and /var/lib/chatd, and enable the service without starting it.
A purge deletes the data, the configuration and the user.

  go build -trimpath -o bin/chatd ./cmd/chatd
  chatd-deb --binary bin/chatd --out bin/     # make deb does both
  dpkg -i bin/chatd_*.deb

SOURCE_DATE_EPOCH, when set, fixes the time stamps for a reproducible package.

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
	if o.version == "" {
		o.version = gitVersion()
	}
	path, err := build(o)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(stdout, path)
	return err
}

// build writes the package described by o into o.outDir and returns its path.
func build(o options) (string, error) {
	version, err := checkVersion(o.version)
	if err != nil {
		return "", err
	}
	if err := checkBinary(o.binary, o.arch); err != nil {
		return "", err
	}
	switch o.compress {
	case "gzip", "xz", "zstd", "none":
	default:
		return "", fmt.Errorf("--compression %q: want gzip, xz, zstd or none", o.compress)
	}
	src := func(p string) string { return filepath.Join(o.deployDir, filepath.FromSlash(p)) }
	for _, p := range []string{"systemd/chatd.service", "debian/chatd.yaml", "debian/postinst", "debian/prerm", "debian/postrm"} {
		if _, err := os.Stat(src(p)); err != nil {
			return "", fmt.Errorf("deploy file (see --deploy): %w", err)
		}
	}
	mode := func(m os.FileMode) *files.ContentFileInfo {
		return &files.ContentFileInfo{Owner: "root", Group: "root", Mode: m}
	}
	info := nfpm.WithDefaults(&nfpm.Info{
		Name: packageName,
		Arch: debianArch(o.arch),
		// Kept as given: nfpm would otherwise read it as semver and drop
		// what it does not understand.
		Version:       version,
		VersionSchema: "none",
		Section:       "net",
		Priority:      "optional",
		Maintainer:    o.maintainer,
		Description:   description,
		Homepage:      homepage,
		Overridables: nfpm.Overridables{
			// postinst creates the user with adduser.
			Depends: []string{"adduser"},
			Deb:     nfpm.Deb{Compression: o.compress},
			Contents: files.Contents{
				{Source: o.binary, Destination: "/usr/bin/chatd", FileInfo: mode(0o755)},
				{Source: src("systemd/chatd.service"), Destination: "/lib/systemd/system/chatd.service", FileInfo: mode(0o644)},
				// 0640: it may hold auth.secret; postinst gives the group
				// chatd read access with dpkg-statoverride.
				{Source: src("debian/chatd.yaml"), Destination: "/etc/chatd/chatd.yaml", Type: files.TypeConfigNoReplace, FileInfo: mode(0o640)},
			},
			Scripts: nfpm.Scripts{
				PostInstall: src("debian/postinst"),
				PreRemove:   src("debian/prerm"),
				PostRemove:  src("debian/postrm"),
			},
		},
	})
	packager, err := nfpm.Get("deb")
	if err != nil {
		return "", fmt.Errorf("nfpm deb packager: %w", err)
	}
	if err := os.MkdirAll(o.outDir, 0o755); err != nil {
		return "", fmt.Errorf("output directory: %w", err)
	}
	out := filepath.Join(o.outDir, packager.ConventionalFileName(info))
	// Written beside its final name and renamed, so that a failed build
	// leaves no truncated .deb behind.
	tmp, err := os.CreateTemp(o.outDir, ".chatd-deb-*")
	if err != nil {
		return "", fmt.Errorf("create package file: %w", err)
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if err := packager.Package(info, tmp); err != nil {
		tmp.Close()
		return "", fmt.Errorf("build %s: %w", filepath.Base(out), err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write %s: %w", out, err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("write %s: %w", out, err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return "", fmt.Errorf("write %s: %w", out, err)
	}
	return out, nil
}

// debianVersionRE is what checkVersion accepts: an optional epoch, an
// upstream version starting with a digit, and an optional Debian revision
// after the last hyphen.
var debianVersionRE = regexp.MustCompile(`^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*$`)

// checkVersion returns v without a leading "v" (v1.2.0 is 1.2.0), or an
// error when dpkg would not take it as a version.
func checkVersion(v string) (string, error) {
	if len(v) > 1 && v[0] == 'v' && v[1] >= '0' && v[1] <= '9' {
		v = v[1:]
	}
	if !debianVersionRE.MatchString(v) || strings.HasSuffix(v, "-") {
		return "", fmt.Errorf("--version %q is not a Debian version (digits first, then letters, digits and . + ~ -)", v)
	}
	return v, nil
}

// gitVersion is the version of the work tree from git describe, as a
// Debian version, or fallbackVersion without git or a repository.
func gitVersion() string {
	d := release.GitDescribe()
	if d == "" {
		return fallbackVersion
	}
	return describeToDebian(d)
}

var (
	// describeTagRE matches git describe on a tag, less -dirty: v1.2.3,
	// v1.2.3-rc.1, v1.2.3-4-gabc1234 (4 commits after the tag).
	describeTagRE = regexp.MustCompile(`^v?([0-9]+(?:\.[0-9]+)*)(?:-([0-9A-Za-z.]+?))?(?:-([0-9]+)-g([0-9a-f]+))?$`)
	// describeHashRE matches git describe --always without a tag: a commit.
	describeHashRE = regexp.MustCompile(`^[0-9a-f]{4,64}$`)
)

// describeToDebian turns git describe output into a Debian version that
// sorts the way the commits do: a pre-release before its release
// (1.2.3~rc.1), commits after a tag after it (1.2.3+4.gabc1234), and an
// untagged commit before any release (0.0.0~dev+gabc1234). Anything else
// gives fallbackVersion.
func describeToDebian(d string) string {
	base, dirty := strings.CutSuffix(d, "-dirty")
	var v string
	var meta []string
	if m := describeTagRE.FindStringSubmatch(base); m != nil {
		v = m[1]
		if m[2] != "" {
			v += "~" + m[2]
		}
		if m[3] != "" {
			meta = append(meta, m[3], "g"+m[4])
		}
	} else if describeHashRE.MatchString(base) {
		v, meta = fallbackVersion, []string{"g" + base}
	} else {
		return fallbackVersion
	}
	if dirty {
		meta = append(meta, "dirty")
	}
	if len(meta) > 0 {
		v += "+" + strings.Join(meta, ".")
	}
	return v
}

// debianArch returns Debian's name of a GOARCH; a name Debian uses already
// is returned as it is.
func debianArch(arch string) string {
	switch arch {
	case "386":
		return "i386"
	case "arm": // GOARM=7, the default, is Debian's armhf
		return "armhf"
	case "ppc64le":
		return "ppc64el"
	}
	return arch
}

// checkBinary refuses a binary that is not a Linux executable for arch, so
// that a package never installs a chatd that cannot run there.
func checkBinary(path, arch string) error {
	r, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("--binary: %w", err)
	}
	defer r.Close()
	f, err := release.Executable(path, r, arch)
	if err != nil {
		return err
	}
	return f.Close()
}
