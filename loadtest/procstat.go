package loadtest

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports, and reading it with
// sysconf would need cgo.
const clockTicks = 100

// ProcSample is one reading of a process's resource use from /proc.
type ProcSample struct {
	// CPU is the user plus system time the process has used.
	CPU time.Duration
	// RSS is the resident set size in bytes.
	RSS int64
}

// ReadProc reads the CPU time and resident memory of process pid.
func ReadProc(pid int) (ProcSample, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ProcSample{}, fmt.Errorf("read stat of pid %d: %w", pid, err)
	}
	cpu, err := parseStat(stat)
	if err != nil {
		return ProcSample{}, fmt.Errorf("parse stat of pid %d: %w", pid, err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ProcSample{}, fmt.Errorf("read status of pid %d: %w", pid, err)
	}
	rss, err := parseStatusRSS(status)
	if err != nil {
		return ProcSample{}, fmt.Errorf("parse status of pid %d: %w", pid, err)
	}
	return ProcSample{CPU: cpu, RSS: rss}, nil
}

// parseStat returns utime+stime from the contents of /proc/PID/stat. The
// command name in parentheses may itself contain spaces and parentheses, so
// fields are counted from the last ')'.
func parseStat(b []byte) (time.Duration, error) {
	end := bytes.LastIndexByte(b, ')')
	if end < 0 {
		return 0, fmt.Errorf("no command name in %q", truncate(b))
	}
	// After "pid (comm)" come state (field 3) ... utime (14) and stime (15).
	fields := bytes.Fields(b[end+1:])
	const utimeIdx, stimeIdx = 14 - 3, 15 - 3
	if len(fields) <= stimeIdx {
		return 0, fmt.Errorf("only %d fields after the command name", len(fields))
	}
	utime, err := strconv.ParseUint(string(fields[utimeIdx]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("utime: %w", err)
	}
	stime, err := strconv.ParseUint(string(fields[stimeIdx]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stime: %w", err)
	}
	return time.Duration(utime+stime) * time.Second / clockTicks, nil
}

// parseStatusRSS returns VmRSS in bytes from the contents of /proc/PID/status.
func parseStatusRSS(b []byte) (int64, error) {
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		rest, ok := bytes.CutPrefix(line, []byte("VmRSS:"))
		if !ok {
			continue
		}
		f := bytes.Fields(rest)
		if len(f) != 2 || string(f[1]) != "kB" {
			return 0, fmt.Errorf("unexpected VmRSS line %q", line)
		}
		kb, err := strconv.ParseInt(string(f[0]), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS: %w", err)
		}
		return kb * 1024, nil
	}
	return 0, fmt.Errorf("no VmRSS line (kernel thread or zombie?)")
}

func truncate(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}

// ProcUsage is a process's resource use over a run.
type ProcUsage struct {
	// PID is the last process watched (a restarted server gets new PIDs).
	PID int `json:"pid"`
	// CPUSeconds is the CPU time used during the run, summed over restarts.
	CPUSeconds float64 `json:"cpu_seconds"`
	// AvgCPUPercent is CPUSeconds over the wall time watched, in percent of one core.
	AvgCPUPercent float64 `json:"avg_cpu_percent"`
	// StartRSSMB is the resident memory when watching started, in MiB.
	StartRSSMB float64 `json:"start_rss_mb"`
	// PeakRSSMB is the largest resident memory seen, in MiB.
	PeakRSSMB float64 `json:"peak_rss_mb"`
	// EndRSSMB is the last resident memory seen, in MiB.
	EndRSSMB float64 `json:"end_rss_mb"`
}

// procWatch follows one process (or its successive incarnations) and turns
// samples into per-interval CPU percentages and run totals.
type procWatch struct {
	mu       sync.Mutex
	pid      int
	started  time.Time
	banked   time.Duration // CPU of earlier incarnations
	base     time.Duration // CPU of the current incarnation before the run
	baseSet  bool
	last     ProcSample
	lastAt   time.Time
	haveLast bool
	startRSS int64
	peakRSS  int64
}

func newProcWatch(pid int) *procWatch {
	w := &procWatch{pid: pid, started: time.Now()}
	if s, err := ReadProc(pid); err == nil {
		w.base, w.baseSet, w.last, w.lastAt, w.haveLast = s.CPU, true, s, w.started, true
		w.startRSS, w.peakRSS = s.RSS, s.RSS
	}
	return w
}

// switchPID banks the CPU used by the current process and follows pid, a
// process the harness has just started, from now on.
func (w *procWatch) switchPID(pid int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.haveLast {
		w.banked += w.last.CPU - w.base
	}
	w.pid, w.base, w.baseSet, w.haveLast = pid, 0, true, false
}

// sample reads the process and returns its CPU use since the previous
// sample in percent of one core, and its RSS in bytes.
func (w *procWatch) sample() (cpuPercent float64, rss int64, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s, err := ReadProc(w.pid)
	if err != nil {
		return 0, 0, err
	}
	now := time.Now()
	if !w.baseSet {
		w.base, w.baseSet = s.CPU, true
	}
	if w.haveLast {
		if dt := now.Sub(w.lastAt); dt > 0 {
			cpuPercent = 100 * float64(s.CPU-w.last.CPU) / float64(dt)
		}
	}
	w.last, w.lastAt, w.haveLast = s, now, true
	if w.startRSS == 0 {
		w.startRSS = s.RSS
	}
	w.peakRSS = max(w.peakRSS, s.RSS)
	return cpuPercent, s.RSS, nil
}

// usage returns the totals so far.
func (w *procWatch) usage() ProcUsage {
	w.mu.Lock()
	defer w.mu.Unlock()
	cpu := w.banked
	if w.haveLast {
		cpu += w.last.CPU - w.base
	}
	u := ProcUsage{
		PID:        w.pid,
		CPUSeconds: cpu.Seconds(),
		StartRSSMB: mib(w.startRSS),
		PeakRSSMB:  mib(w.peakRSS),
		EndRSSMB:   mib(w.last.RSS),
	}
	if wall := w.lastAt.Sub(w.started); wall > 0 && w.haveLast {
		u.AvgCPUPercent = 100 * float64(cpu) / float64(wall)
	}
	return u
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
