package config

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// DefaultYAML returns a configuration file that sets every key to its
// built-in default, each under a comment saying what it does and which
// environment variable overrides it: a file to start from (chatd
// defaultconfig prints it).
func DefaultYAML() string {
	var b strings.Builder
	b.WriteString("# chatd configuration: every setting at its built-in default.\n")
	b.WriteString("# Keep only what you change. Environment variables (shown per key) override\n")
	b.WriteString("# this file, and command-line flags override both. Durations: 100ms, 30s, 720h.\n")
	var open []string // the sections the previous key was in
	for _, l := range leaves(Default()) {
		path := strings.Split(l.key, ".")
		sections, name := path[:len(path)-1], path[len(path)-1]
		common := 0
		for common < len(open) && common < len(sections) && open[common] == sections[common] {
			common++
		}
		for i := common; i < len(sections); i++ {
			fmt.Fprintf(&b, "\n%s%s:\n", strings.Repeat("  ", i), sections[i])
		}
		open = sections
		indent := strings.Repeat("  ", len(sections))
		if len(sections) == 0 || common == len(sections) {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "%s# %s (env %s)\n", indent, help[l.key], EnvName(l.key))
		fmt.Fprintf(&b, "%s%s: %s\n", indent, name, yamlValue(l.value))
	}
	return b.String()
}

// yamlValue writes v as a YAML scalar that Load reads back as v: strings
// double-quoted, durations as their strings, lists empty.
func yamlValue(v any) string {
	switch v := v.(type) {
	case string:
		return strconv.Quote(v)
	case time.Duration:
		return strconv.Quote(formatDuration(v))
	case bool, int, int64, uint64, float64:
		return fmt.Sprint(v)
	default:
		// auth.issuers, empty by default; its entries are documented with the key.
		return "[]"
	}
}
