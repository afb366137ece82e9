package broker

import "runtime/debug"

// Version is chatd's version: the module version it was built as, and the
// commit when the build recorded one ("(devel)" for a plain go build).
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " " + s.Value[:12]
		}
	}
	return v
}
