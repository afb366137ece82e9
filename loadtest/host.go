package loadtest

import (
	"bufio"
	"bytes"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// Host describes the machine a run happened on, so numbers from different
// machines are not compared blindly.
type Host struct {
	// CPUs is the number of logical CPUs.
	CPUs int `json:"cpus"`
	// CPUModel is the first "model name" of /proc/cpuinfo.
	CPUModel string `json:"cpu_model,omitempty"`
	// MemMB is the total memory in MiB.
	MemMB int64 `json:"mem_mb,omitempty"`
	// GoVersion is the Go release the load tester was built with.
	GoVersion string `json:"go_version"`
}

// hostInfo reads what it can; missing /proc files leave fields empty.
func hostInfo() Host {
	h := Host{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		h.CPUModel = procField(b, "model name")
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := strings.Fields(procField(b, "MemTotal")); len(f) == 2 && f[1] == "kB" {
			if kb, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				h.MemMB = kb / 1024
			}
		}
	}
	return h
}

// procField returns the value of the first "key: value" line of a /proc file.
func procField(b []byte, key string) string {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
