package main

import (
	"math"
	"os"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/KimMachineGun/automemlimit/memlimit"

	"github.com/chatd/chatd/config"
)

func TestSetMemoryLimit(t *testing.T) {
	prev := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(prev) })
	system, err := memlimit.FromSystem()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		env        string // GOMEMLIMIT, as the runtime would have applied it
		cfg        config.Memory
		wantSource string
		want       func(limit int64) bool
	}{
		{"explicit", "", config.Memory{Limit: 300 << 20, LimitRatio: 0.9}, "memory.limit",
			func(l int64) bool { return l == 300<<20 }},
		{"environment wins", "200MiB", config.Memory{Limit: 300 << 20, LimitRatio: 0.9}, "GOMEMLIMIT",
			func(l int64) bool { return l == 200<<20 }},
		{"derived", "", config.Memory{LimitRatio: 0.5}, "0.5 of the",
			func(l int64) bool { return l > 0 && l <= int64(system)/2+1 }},
		{"AUTOMEMLIMIT ratio", "", config.Memory{LimitRatio: 0.5}, "AUTOMEMLIMIT=0.25 of the",
			func(l int64) bool { return l > 0 && l <= int64(system)/4+1 }},
		{"AUTOMEMLIMIT off", "", config.Memory{LimitRatio: 0.5}, "AUTOMEMLIMIT=off",
			func(l int64) bool { return l == math.MaxInt64 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("GOMEMLIMIT", tt.env)
			t.Setenv("AUTOMEMLIMIT", "") // restored after the test, unset during it unless named
			if err := os.Unsetenv("AUTOMEMLIMIT"); err != nil {
				t.Fatal(err)
			}
			if v, ok := strings.CutPrefix(tt.wantSource, "AUTOMEMLIMIT="); ok {
				t.Setenv("AUTOMEMLIMIT", strings.Fields(v)[0])
				debug.SetMemoryLimit(math.MaxInt64)
			}
			if tt.env != "" {
				debug.SetMemoryLimit(200 << 20) // what the runtime read at start
			}
			limit, source, err := setMemoryLimit(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(source, tt.wantSource) || !tt.want(limit) {
				t.Fatalf("limit %d from %q, want from %q", limit, source, tt.wantSource)
			}
			if got := debug.SetMemoryLimit(-1); got != limit || (got == math.MaxInt64) != (tt.wantSource == "AUTOMEMLIMIT=off") {
				t.Fatalf("runtime limit %d, want %d", got, limit)
			}
		})
	}
}
