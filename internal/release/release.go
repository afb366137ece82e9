// Package release holds what the packaging commands (cmd/chatd-deb,
// cmd/chatd-image) share: the check that a chatd binary can run on the
// target, and the work tree's version from git.
package release

import (
	"debug/elf"
	"fmt"
	"io"
	"os/exec"
	"strings"
)

// ELFMachines maps the architectures chatd is built for, by their GOARCH
// and Debian names, to the ELF machine of their executables.
var ELFMachines = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "386": elf.EM_386, "i386": elf.EM_386,
	"arm64": elf.EM_AARCH64, "arm": elf.EM_ARM, "armhf": elf.EM_ARM, "armel": elf.EM_ARM,
	"riscv64": elf.EM_RISCV, "ppc64le": elf.EM_PPC64, "ppc64el": elf.EM_PPC64,
	"s390x": elf.EM_S390, "loong64": elf.EM_LOONGARCH,
}

// Executable opens r, the binary at path, as an ELF file and refuses it
// unless it is an executable, built for arch when arch is one of
// ELFMachines. The caller closes the file.
func Executable(path string, r io.ReaderAt, arch string) (*elf.File, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("--binary %s is not a Linux executable: %w", path, err)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		f.Close()
		return nil, fmt.Errorf("--binary %s is an ELF %s, not an executable", path, f.Type)
	}
	if want, ok := ELFMachines[arch]; ok && f.Machine != want {
		f.Close()
		return nil, fmt.Errorf("--binary %s is built for %s, not for --arch %s", path, f.Machine, arch)
	}
	return f, nil
}

// GitDescribe returns git describe --tags --always --dirty of the work
// tree (v1.2.3, v1.2.3-4-gabc1234, abc1234-dirty), or "" without git or a
// repository.
func GitDescribe() string {
	out, err := exec.Command("git", "describe", "--tags", "--always", "--dirty").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
