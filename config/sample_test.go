package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestDefaultYAML: the sample file loads back as the defaults, and names
// every key with its help and environment variable.
func TestDefaultYAML(t *testing.T) {
	y := DefaultYAML()
	file := filepath.Join(t.TempDir(), "chatd.yaml")
	if err := os.WriteFile(file, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := pflag.NewFlagSet("test", pflag.ContinueOnError)
	BindFlags(fs)
	dir := t.TempDir()
	if err := fs.Parse([]string{"--data-dir", dir}); err != nil {
		t.Fatal(err)
	}
	got, err := Load(file, fs)
	if err != nil {
		t.Fatalf("load the sample: %v\n%s", err, y)
	}
	want := Default()
	want.DataDir = dir
	if len(got.Auth.Issuers) == 0 {
		got.Auth.Issuers = want.Auth.Issuers // [] or nil: none either way
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("the sample loads as\n%+v\nwant the defaults\n%+v", got, want)
	}
	for _, s := range Settings() {
		if !strings.Contains(y, s.Env) || !strings.Contains(y, s.Help) {
			t.Errorf("sample lacks %s: %s (%s)", s.Key, s.Help, s.Env)
		}
	}
}
