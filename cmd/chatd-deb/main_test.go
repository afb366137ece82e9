package main

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/testutil"
)

// testVersion marks the packages this test builds, so that one left
// installed by an interrupted run can be told from a real installation.
const testVersion = "0.0.0~debtest"

// The paths the package installs or its scripts create.
const (
	binPath      = "/usr/bin/chatd"
	unitPath     = "/lib/systemd/system/chatd.service"
	confPath     = "/etc/chatd/chatd.yaml"
	dataDir      = "/var/lib/chatd"
	wantsLink    = "/etc/systemd/system/multi-user.target.wants/chatd.service"
	maskLink     = "/etc/systemd/system/chatd.service"
	dpkgLockWait = 2 * time.Minute // how long dpkg may wait for another dpkg or apt
)

func TestDescribeToDebian(t *testing.T) {
	for _, c := range []struct{ describe, want string }{
		{"v1.2.3", "1.2.3"},
		{"1.2.3", "1.2.3"},
		{"v1.2.3-dirty", "1.2.3+dirty"},
		{"v1.2.3-4-gabc1234", "1.2.3+4.gabc1234"},
		{"v1.2.3-4-gabc1234-dirty", "1.2.3+4.gabc1234.dirty"},
		{"v1.2.3-rc.1", "1.2.3~rc.1"},
		{"v1.2.3-rc.1-4-gabc1234", "1.2.3~rc.1+4.gabc1234"},
		{"v2", "2"},
		{"17a3cc1", "0.0.0~dev+g17a3cc1"},
		{"abc1234-dirty", "0.0.0~dev+gabc1234.dirty"},
		{"release-candidate", fallbackVersion},
		{"", fallbackVersion},
	} {
		got := describeToDebian(c.describe)
		if got != c.want {
			t.Errorf("describeToDebian(%q) = %q, want %q", c.describe, got, c.want)
		}
		if _, err := checkVersion(got); err != nil {
			t.Errorf("describeToDebian(%q) = %q, which checkVersion refuses: %v", c.describe, got, err)
		}
	}
}

func TestCheckVersion(t *testing.T) {
	for in, want := range map[string]string{"v1.0.0": "1.0.0", "1.0.0-1": "1.0.0-1", "2:1.0~rc1+git3": "2:1.0~rc1+git3"} {
		if got, err := checkVersion(in); err != nil || got != want {
			t.Errorf("checkVersion(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "v", "latest", "1.0 beta", "1.0-", "1_0"} {
		if got, err := checkVersion(in); err == nil {
			t.Errorf("checkVersion(%q) = %q, want an error", in, got)
		}
	}
}

func TestRefusesWhatIsNotABinaryForArch(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	otherArch := "s390x"
	if runtime.GOARCH == otherArch {
		otherArch = "amd64"
	}
	out := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--binary", filepath.Join(out, "missing")}, "no such file"},
		{[]string{"--binary", "main.go"}, "not a Linux executable"},
		{[]string{"--binary", self, "--arch", otherArch}, "not for --arch " + otherArch},
		{[]string{"--binary", self, "--version", "latest"}, "not a Debian version"},
		{[]string{"--version", "1.0"}, "--binary is required"},
		{[]string{"--binary", self, "--compression", "lzma"}, "--compression"},
	} {
		var stdout, stderr bytes.Buffer
		err := run(append(c.args, "--out", out, "--deploy", "../../deploy"), &stdout, &stderr)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("run(%q) = %v, want an error saying %q", c.args, err, c.want)
		}
	}
	if entries, _ := os.ReadDir(out); len(entries) != 0 {
		t.Errorf("failed builds left %d files in --out", len(entries))
	}
}

// TestDebianPackage builds chatd and its .deb, checks what the package
// holds, then, as root, installs it with dpkg on this machine, checks the
// files, the chatd user, a server run as that user with the packaged
// configuration and the systemd unit (systemd-analyze), and removes and
// purges it again.
func TestDebianPackage(t *testing.T) {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Skip("dpkg-deb is missing (apt-get install dpkg): cannot inspect a .deb")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "chatd")
	if out, err := exec.Command("go", "build", "-trimpath", "-o", bin, "github.com/chatd/chatd/cmd/chatd").CombinedOutput(); err != nil {
		t.Fatalf("go build chatd: %v\n%s", err, out)
	}
	// Uncompressed: under the race detector (make test) gzip alone takes a
	// minute for chatd's 40 MB; TestGzipPackage covers the default.
	deb := buildDeb(t, dir, "--binary", bin, "--compression", "none")

	t.Run("contents", func(t *testing.T) { checkContents(t, deb) })
	t.Run("control", func(t *testing.T) { checkControl(t, deb) })
	t.Run("install", func(t *testing.T) { checkInstall(t, deb) })
}

// TestGzipPackage builds a package with the default compression, of a
// small executable in chatd's stead, and checks that dpkg-deb reads it.
func TestGzipPackage(t *testing.T) {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		t.Skip("dpkg-deb is missing (apt-get install dpkg): cannot inspect a .deb")
	}
	small, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true executable to package")
	}
	deb := buildDeb(t, t.TempDir(), "--binary", small)
	b, err := os.ReadFile(deb)
	if err != nil {
		t.Fatal(err)
	}
	// The ar archive's members: debian-binary, control.tar.gz, data.tar.gz.
	if !bytes.HasPrefix(b, []byte("!<arch>\ndebian-binary ")) || !bytes.Contains(b, []byte("data.tar.gz ")) {
		t.Errorf("%s is not a .deb with a data.tar.gz", deb)
	}
	checkContents(t, deb)
	checkControl(t, deb)
}

// buildDeb runs chatd-deb with args and the test's version, output
// directory and deploy files, and returns the path of the .deb.
func buildDeb(t *testing.T, dir string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	args = append(args, "--version", testVersion, "--out", dir, "--deploy", "../../deploy")
	if err := run(args, &stdout, &stderr); err != nil {
		t.Fatalf("chatd-deb %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	deb := strings.TrimSpace(stdout.String())
	if want := filepath.Join(dir, "chatd_"+testVersion+"_"+debianArch(runtime.GOARCH)+".deb"); deb != want {
		t.Fatalf("chatd-deb printed %q, want %q", deb, want)
	}
	return deb
}

// checkContents checks the files of the package, their modes and owners.
func checkContents(t *testing.T, deb string) {
	out := command(t, "dpkg-deb", "--contents", deb)
	want := map[string]string{
		"./usr/bin/chatd":                    "-rwxr-xr-x root/root",
		"./lib/systemd/system/chatd.service": "-rw-r--r-- root/root",
		"./etc/chatd/chatd.yaml":             "-rw-r----- root/root",
	}
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb --contents line %q", line)
		}
		if strings.HasPrefix(f[0], "d") {
			continue
		}
		got[f[5]] = f[0] + " " + f[1]
	}
	for path, attrs := range want {
		if got[path] != attrs {
			t.Errorf("%s: %q, want %q", path, got[path], attrs)
		}
	}
	for path := range got {
		if _, ok := want[path]; !ok {
			t.Errorf("unexpected file in the package: %s", path)
		}
	}
	if t.Failed() {
		t.Logf("dpkg-deb --contents:\n%s", out)
	}
}

// checkControl checks the control fields, the conffile and the scripts.
func checkControl(t *testing.T, deb string) {
	fields := command(t, "dpkg-deb", "--field", deb)
	for _, want := range []string{
		"Package: chatd",
		"Version: " + testVersion,
		"Architecture: " + debianArch(runtime.GOARCH),
		"Depends: adduser",
		"Section: net",
		"Homepage: " + homepage,
		"Maintainer: " + defaultMaintainer,
		"Description: durable MQTT chat server",
	} {
		if !strings.Contains(fields, want+"\n") {
			t.Errorf("control has no line %q:\n%s", want, fields)
		}
	}
	if got := command(t, "dpkg-deb", "--info", deb, "conffiles"); got != confPath+"\n" {
		t.Errorf("conffiles = %q, want %q", got, confPath+"\n")
	}
	info := command(t, "dpkg-deb", "--info", deb)
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		// dpkg-deb marks an executable member with a *.
		if !regexp.MustCompile(`\*\s+` + script + `\s+#!/bin/sh`).MatchString(info) {
			t.Errorf("no executable %s script in:\n%s", script, info)
		}
		packaged := command(t, "dpkg-deb", "--info", deb, script)
		source, err := os.ReadFile(filepath.Join("..", "..", "deploy", "debian", script))
		if err != nil {
			t.Fatal(err)
		}
		if packaged != string(source) {
			t.Errorf("the packaged %s differs from deploy/debian/%s", script, script)
		}
	}
}

// checkInstall installs, reinstalls, removes and purges the package, when
// this test runs as root on a machine with dpkg and no chatd of its own.
func checkInstall(t *testing.T, deb string) {
	if os.Geteuid() != 0 {
		t.Skip("installing the package needs root: dpkg -i not tried")
	}
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("dpkg is missing: the package cannot be installed here")
	}
	lockMachine(t)
	if st := packageStatus(t); st != "" {
		if !strings.HasSuffix(st, " "+testVersion) {
			t.Skipf("a chatd package is on this machine already (%s): not touching it", st)
		}
		t.Logf("purging the package an interrupted run left (%s)", st)
		dpkg(t, "--purge", "chatd")
	}
	for _, p := range []string{dataDir, "/etc/chatd"} {
		if _, err := os.Lstat(p); err == nil {
			t.Skipf("%s exists already, not from this package: not touching it", p)
		}
	}
	if _, err := user.Lookup("chatd"); err == nil {
		t.Skip("a user chatd exists already, not from this package: not touching it")
	}
	if _, err := user.LookupGroup("chatd"); err == nil {
		t.Skip("a group chatd exists already, not from this package: not touching it")
	}
	t.Cleanup(func() {
		// Even when a check failed: leave the machine as it was.
		if out, err := dpkgOutput("--purge", "chatd"); err != nil {
			t.Errorf("cleanup: dpkg --purge chatd: %v\n%s", err, out)
		}
	})

	dpkg(t, "-i", deb)
	if err := exec.Command(binPath, "--help").Run(); err != nil {
		t.Errorf("%s --help: %v", binPath, err)
	}
	usr := checkUser(t)
	checkMode(t, dataDir, fs.ModeDir|0o750, usr.uid, usr.gid)
	checkMode(t, confPath, 0o640, 0, usr.gid)
	checkMode(t, unitPath, 0o644, 0, 0)
	if _, err := exec.LookPath("deb-systemd-helper"); err == nil {
		if target, err := os.Readlink(wantsLink); err != nil || target != unitPath {
			t.Errorf("the unit is not enabled: %s -> %q, %v", wantsLink, target, err)
		}
	}
	t.Run("systemd-analyze", checkUnit)
	t.Run("serve", func(t *testing.T) { checkServe(t, usr) })

	// Again, as an upgrade does: the administrator's configuration and the
	// data stay, and so do the configuration's permissions.
	f, err := os.OpenFile(confPath, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	const edit = "# edited by TestDebianPackage\n"
	if _, err := f.WriteString(edit); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	dpkg(t, "-i", deb)
	if b, err := os.ReadFile(confPath); err != nil || !strings.HasSuffix(string(b), edit) {
		t.Errorf("a reinstall lost the edit of %s (%v)", confPath, err)
	}
	checkMode(t, confPath, 0o640, 0, usr.gid)
	checkUser(t)

	// A remove keeps the configuration, the data and the user.
	dpkg(t, "--remove", "chatd")
	for _, p := range []string{binPath, unitPath} {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("after dpkg --remove, %s: %v, want it gone", p, err)
		}
	}
	for _, p := range []string{confPath, dataDir} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("after dpkg --remove, %s should be kept: %v", p, err)
		}
	}
	checkUser(t)

	// A purge deletes them all.
	dpkg(t, "--purge", "chatd")
	for _, p := range []string{binPath, unitPath, "/etc/chatd", dataDir, wantsLink, maskLink} {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("after dpkg --purge, %s: %v, want it gone", p, err)
		}
	}
	if _, err := user.Lookup("chatd"); err == nil {
		t.Error("after dpkg --purge, the user chatd is still there")
	}
	if _, err := user.LookupGroup("chatd"); err == nil {
		t.Error("after dpkg --purge, the group chatd is still there")
	}
	if out, _ := exec.Command("dpkg-statoverride", "--list", confPath).Output(); len(out) > 0 {
		t.Errorf("after dpkg --purge, a statoverride is left: %s", out)
	}
	if st := packageStatus(t); st != "" {
		t.Errorf("after dpkg --purge, dpkg still knows chatd: %s", st)
	}
}

// account is the chatd user as the system knows it.
type account struct{ uid, gid int }

// checkUser checks the chatd system user and group and returns their ids.
func checkUser(t *testing.T) account {
	t.Helper()
	out, err := exec.Command("getent", "passwd", "chatd").Output()
	if err != nil {
		t.Fatalf("getent passwd chatd: %v", err)
	}
	// name:x:uid:gid:gecos:home:shell
	f := strings.Split(strings.TrimSpace(string(out)), ":")
	if len(f) != 7 {
		t.Fatalf("getent passwd chatd: %q", out)
	}
	uid, _ := strconv.Atoi(f[2])
	gid, _ := strconv.Atoi(f[3])
	if uid == 0 || uid >= 1000 {
		t.Errorf("chatd has uid %d, want a system user's", uid)
	}
	if f[5] != dataDir || !strings.HasSuffix(f[6], "nologin") {
		t.Errorf("chatd has home %s and shell %s, want %s and nologin", f[5], f[6], dataDir)
	}
	g, err := user.LookupGroup("chatd")
	if err != nil {
		t.Fatalf("group chatd: %v", err)
	}
	if g.Gid != strconv.Itoa(gid) {
		t.Errorf("chatd's primary group is %d, not chatd (%s)", gid, g.Gid)
	}
	return account{uid, gid}
}

// checkMode checks the type, permissions and owner of path.
func checkMode(t *testing.T, path string, mode fs.FileMode, uid, gid int) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Error(err)
		return
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode() != mode || int(st.Uid) != uid || int(st.Gid) != gid {
		t.Errorf("%s: %v %d:%d, want %v %d:%d", path, fi.Mode(), st.Uid, st.Gid, mode, uid, gid)
	}
}

// checkUnit runs systemd-analyze on the installed unit: verify must find
// nothing to say about it, and the offline security review must rate its
// exposure 2.0 or lower (of 10), so that the hardening is not lost.
func checkUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze is missing (apt-get install systemd)")
	}
	out, err := exec.Command("systemd-analyze", "verify", unitPath).CombinedOutput()
	t.Logf("systemd-analyze verify %s: %v %q", unitPath, err, out)
	if err != nil || strings.Contains(string(out), "chatd") {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitPath, err, out)
	}
	out, err = exec.Command("systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", unitPath).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure over 2.0 (%v)\n%s", err, out)
	}
}

// checkServe runs the installed chatd as the chatd user with the packaged
// configuration, as the unit does: checkconfig, then serve (on ports of
// its own choosing) until it has started, stopped with SIGTERM as
// systemctl stop does.
func checkServe(t *testing.T, usr account) {
	asChatd := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(usr.uid), Gid: uint32(usr.gid)}}
	// The unit's ExecStartPre, as the unit runs it.
	check := exec.Command(binPath, "checkconfig", "--config", confPath)
	check.Dir, check.SysProcAttr = "/", asChatd
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("chatd checkconfig --config %s as chatd: %v\n%s", confPath, err, out)
	}

	var log testutil.SyncBuffer
	cmd := exec.Command(binPath, "serve", "--config", confPath, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0")
	cmd.Dir, cmd.SysProcAttr = "/", asChatd
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waited := false // set once done was received
	t.Cleanup(func() {
		if !waited {
			_ = cmd.Process.Kill()
			<-done
		}
	})
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(log.String(), "chatd started"); {
		select {
		case err := <-done:
			waited = true
			t.Fatalf("chatd serve as chatd with %s exited before it started: %v\n%s", confPath, err, log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("chatd serve as chatd with %s has not started after 15s\n%s", confPath, log.String())
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		waited = true
		if err != nil {
			t.Errorf("chatd serve after SIGTERM: %v\n%s", err, log.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("chatd serve did not stop within 20s of SIGTERM\n%s", log.String())
	}
	// Without auth.secret it made its development secret in data_dir.
	checkMode(t, filepath.Join(dataDir, "dev-secret"), 0o600, usr.uid, usr.gid)
}

// lockMachine keeps two runs of this test (two go test processes on one
// machine) from installing the package at once, until t ends.
func lockMachine(t *testing.T) {
	f, err := os.OpenFile("/run/lock/chatd-debian-package-test.lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("lock: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatalf("lock: %v", err)
	}
	t.Cleanup(func() { f.Close() }) // closing releases the lock
}

// packageStatus is "STATUS VERSION" of the chatd package when dpkg knows it
// (installed, or removed with its configuration kept), or "".
func packageStatus(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", "chatd").Output()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return "" // dpkg-query: no packages found matching chatd
	}
	if err != nil {
		t.Fatalf("dpkg-query: %v", err)
	}
	st := strings.TrimSpace(string(out))
	if strings.HasPrefix(st, "un ") || !strings.Contains(st, " ") {
		return ""
	}
	return st
}

// dpkg runs dpkg with args and fails t when it fails.
func dpkg(t *testing.T, args ...string) {
	t.Helper()
	out, err := dpkgOutput(args...)
	if err != nil {
		t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	t.Logf("dpkg %s:\n%s", strings.Join(args, " "), out)
}

// dpkgOutput runs dpkg with args, waiting while another dpkg or apt-get
// holds dpkg's lock, and returns its output.
func dpkgOutput(args ...string) (string, error) {
	deadline := time.Now().Add(dpkgLockWait)
	for {
		cmd := exec.Command("dpkg", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err == nil || !bytes.Contains(out, []byte("lock")) || time.Now().After(deadline) {
			return string(out), err
		}
		time.Sleep(time.Second)
	}
}

// command runs name with args and returns its standard output, failing t
// when it fails.
func command(t *testing.T, name string, args ...string) string {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}
