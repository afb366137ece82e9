package main

import (
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"

	"github.com/KimMachineGun/automemlimit/memlimit"

	"github.com/chatd/chatd/config"
)

// setMemoryLimit sets the Go runtime's soft memory limit from c and
// returns it with where it came from. A GOMEMLIMIT environment variable,
// which the runtime has already applied, wins; then memory.limit; then
// memory.limit_ratio (or automemlimit's AUTOMEMLIMIT variable) of the
// cgroup's memory limit, or of the machine's memory when the process
// runs in none.
func setMemoryLimit(c config.Memory) (limit int64, source string, err error) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return debug.SetMemoryLimit(-1), "GOMEMLIMIT", nil
	}
	if c.Limit > 0 {
		debug.SetMemoryLimit(c.Limit)
		return c.Limit, "memory.limit", nil
	}
	// automemlimit reads AUTOMEMLIMIT too: "off", or a ratio that
	// overrides memory.limit_ratio.
	ratio := fmt.Sprint(c.LimitRatio)
	if v, ok := os.LookupEnv("AUTOMEMLIMIT"); ok {
		if v == "off" {
			return debug.SetMemoryLimit(-1), "AUTOMEMLIMIT=off (none)", nil
		}
		ratio = "AUTOMEMLIMIT=" + v
	}
	source = "cgroup memory limit"
	if _, err := memlimit.FromCgroup(); err != nil {
		source = "machine memory"
	}
	limit, err = memlimit.Set(
		memlimit.WithRatio(c.LimitRatio),
		memlimit.WithProvider(memlimit.ApplyFallback(memlimit.FromCgroup, memlimit.FromSystem)),
	)
	if err != nil {
		return limit, source, fmt.Errorf("memory limit from the %s: %w", source, err)
	}
	return limit, fmt.Sprintf("%s of the %s", ratio, source), nil
}

// logMemoryLimit sets the memory limit and logs it, or why it could not
// be set; the server runs either way.
func logMemoryLimit(c config.Memory, logger *slog.Logger) {
	limit, source, err := setMemoryLimit(c)
	if err != nil {
		logger.Warn("memory limit not set: the heap may grow to twice what it holds", "error", err)
		return
	}
	logger.Info("memory limit", "bytes", limit, "mib", limit>>20, "from", source)
}
