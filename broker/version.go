package broker

import "runtime/debug"

// Version is chatd's version: the module version it was built as, and the
// commit when the build recorded one ("(devel)" for a plain go build).
func Version() string {
	v, commit := BuildInfo()
	if commit != "" {
		v += " " + commit
	}
	return v
}

// BuildInfo returns the module version chatd was built as and the first
// 12 digits of its commit ("" when the build recorded none, with
// "+dirty" when the tree had changes).
func BuildInfo() (version, commit string) {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown", ""
	}
	dirty := false
	for _, s := range bi.Settings {
		switch {
		case s.Key == "vcs.revision" && len(s.Value) >= 12:
			commit = s.Value[:12]
		case s.Key == "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if commit != "" && dirty {
		commit += "+dirty"
	}
	return bi.Main.Version, commit
}
