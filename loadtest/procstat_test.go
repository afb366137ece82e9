package loadtest

import (
	"os"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// Fields 14 and 15 (utime, stime) are 250 and 50 ticks.
	const rest = " S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 200 300"
	tests := []struct {
		name    string
		stat    string
		want    time.Duration
		wantErr bool
	}{
		{"plain name", "1234 (chatd)" + rest, 3 * time.Second, false},
		{"name with spaces and parentheses", "1234 (my (odd) server)" + rest, 3 * time.Second, false},
		{"no name", "1234 chatd S 1 2", 0, true},
		{"too few fields", "1234 (chatd) S 1 2 3", 0, true},
		{"non-numeric utime", "1234 (chatd) S 1 2 3 4 5 6 7 8 9 10 x 50 0", 0, true},
		{"non-numeric stime", "1234 (chatd) S 1 2 3 4 5 6 7 8 9 10 1 y 0", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStat([]byte(tt.stat))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("cpu = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestParseStatusRSS(t *testing.T) {
	tests := []struct {
		name    string
		status  string
		want    int64
		wantErr bool
	}{
		{"present", "Name:\tchatd\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t7\n", 2048 * 1024, false},
		{"kernel thread has none", "Name:\tkthreadd\nThreads:\t1\n", 0, true},
		{"unexpected unit", "VmRSS:\t2 MB\n", 0, true},
		{"not a number", "VmRSS:\tlots kB\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatusRSS([]byte(tt.status))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("rss = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestReadProcSelf(t *testing.T) {
	s, err := ReadProc(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s.RSS <= 0 {
		t.Errorf("rss = %d, want > 0", s.RSS)
	}
	if s.CPU < 0 {
		t.Errorf("cpu = %s, want >= 0", s.CPU)
	}
	if _, err := ReadProc(-1); err == nil {
		t.Error("ReadProc(-1) succeeded")
	}
}

func TestProcWatchSelf(t *testing.T) {
	w := newProcWatch(os.Getpid())
	// Burn a little CPU so the sample has something to measure.
	x := 0
	for i := range 5_000_000 {
		x += i % 7
	}
	cpu, rss, err := w.sample()
	if err != nil {
		t.Fatal(err)
	}
	if cpu < 0 || rss <= 0 {
		t.Errorf("sample: cpu %.1f%%, rss %d (x=%d)", cpu, rss, x)
	}
	u := w.usage()
	if u.PID != os.Getpid() || u.PeakRSSMB <= 0 || u.CPUSeconds < 0 {
		t.Errorf("usage %+v", u)
	}
	w.switchPID(os.Getpid())
	if got := w.usage(); got.CPUSeconds < u.CPUSeconds {
		t.Errorf("switching PID lost banked CPU: %.3f s < %.3f s", got.CPUSeconds, u.CPUSeconds)
	}
}

func TestHostInfo(t *testing.T) {
	h := hostInfo()
	if h.CPUs <= 0 || h.GoVersion == "" || h.MemMB <= 0 {
		t.Errorf("host %+v", h)
	}
}
