package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/chatd/chatd/loadtest"
)

func TestCommands(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantOut string
		wantErr string
	}{
		{"scenarios", []string{"scenarios"}, "crash", ""},
		{"unknown scenario", []string{"run", "gossip"}, "", "invalid argument"},
		{"no scenario", []string{"run"}, "", "accepts 1 arg"},
		{"bad flag value", []string{"run", "chat", "--users", "1", "--plain"}, "", "--users"},
		// --server-cmd is repeated, never split on its commas.
		{"server-cmd per node", []string{"run", "crash", "--plain", "--broker", "tcp://127.0.0.1:1,tcp://127.0.0.1:2",
			"--server-cmd", "a --routes x,y", "--server-cmd", "b", "--server-cmd", "c"}, "", "3 times for 2"},
		{"compare needs pairs", []string{"compare", "a.json"}, "", "pairs"},
		{"compare missing file", []string{"compare", "nope-a.json", "nope-b.json"}, "", "read report"},
		{"compare nothing with nothing", []string{"compare", "-", "-"}, "", "for both reports"},
		{"restart without server", []string{"run", "restart", "--plain"}, "", "--server-cmd"},
		{"label with a bar", []string{"run", "chat", "--plain", "--label", "a|b"}, "", "--label"},
		{"bad threshold", []string{"run", "chat", "--plain", "--threshold", "lost = 0"}, "", "FIGURE OP VALUE"},
		{"agent help", []string{"agent", "--help"}, "trusted network", ""},
		{"run help tells of agents", []string{"run", "--help"}, "--agents HOST:PORT", ""},
		{"agents run chat only", []string{"run", "crash", "--plain", "--agents", "127.0.0.1:1"}, "", "agents run the chat scenario only, not crash"},
		{"agents and live metrics", []string{"run", "chat", "--agents", "127.0.0.1:1", "--metrics-listen", "127.0.0.1:0"}, "", "--metrics-listen is not for runs on agents"},
		{"agents and a password", []string{"run", "chat", "--plain", "--agents", "127.0.0.1:1", "--password", "pw"}, "", "never sent to agents"},
		{"agent not there", []string{"run", "chat", "--plain", "--agents", "127.0.0.1:1"}, "", "agent 127.0.0.1:1: not reachable"},
		{"agent with arguments", []string{"agent", "now"}, "", "unknown command"},
		{"workloads", []string{"workloads"}, "new-year\n  New Year's Eve", ""},
		{"workload needs one", []string{"run", "workload", "--secret", "s"}, "", "--workload: the workload scenario needs one"},
		{"unknown workload", []string{"run", "workload", "--workload", "nope.yaml"}, "", "the built-in ones are new-year, quiet-evening"},
		{"workload not plain", []string{"run", "workload", "--workload", "new-year", "--plain"}, "", "--plain: the workload scenario"},
		{"workload API", []string{"run", "workload", "--workload", "new-year", "--secret", "s", "--api", "127.0.0.1:8080"}, "", "--api"},
		{"workload over MQTT 5", []string{"run", "workload", "--workload", "new-year", "--secret", "s", "--protocol", "5"}, "", "speak MQTT 3.1.1"},
		{"workload speed", []string{"run", "workload", "--workload", "quiet-evening", "--secret", "s", "--speed", "0"}, "", "--speed"},
		{"run help tells of workloads", []string{"run", "--help"}, "docs/workloads.md", ""},
		{"run help tells of MQTT 5", []string{"run", "--help"}, "--protocol-mix 5:70,3:30", ""},
		{"protocol and protocol mix", []string{"run", "chat", "--plain", "--protocol", "5", "--protocol-mix", "5:50,3:50"}, "", "exclusive"},
		{"protocol mix short of 100", []string{"run", "chat", "--plain", "--protocol-mix", "5:50,3:40"}, "", "sum to 90"},
		{"receive maximum for MQTT 3.1.1", []string{"run", "chat", "--plain", "--receive-maximum", "5"}, "", "MQTT 5 setting"},
		{"protocol 4", []string{"run", "chat", "--plain", "--protocol", "4"}, "", "want 3 (MQTT 3.1.1) or 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			cmd := newRootCmd(&stdout, &stderr)
			cmd.SetArgs(tt.args)
			err := cmd.ExecuteContext(context.Background())
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("err = %v, want one mentioning %q", err, tt.wantErr)
			}
			if !strings.Contains(stdout.String(), tt.wantOut) {
				t.Errorf("stdout %q lacks %q", stdout.String(), tt.wantOut)
			}
			var ee exitError
			if errors.As(err, &ee) {
				t.Errorf("a usage error came back as exit status %d", ee.code)
			}
		})
	}
}

// TestRunFlagDefaults checks that the run command's flags default to
// loadtest.DefaultConfig, which flagVar reads from the variables it binds.
func TestRunFlagDefaults(t *testing.T) {
	def := loadtest.DefaultConfig()
	tests := []struct {
		flag string
		want string
	}{
		{"broker", def.Broker},
		{"users", strconv.Itoa(def.Users)},
		{"duration", def.Duration.String()},
		{"connect-rate", strconv.FormatFloat(def.ConnectRate, 'g', -1, 64)},
		{"cuts", "[" + strings.Join(def.Cuts, ",") + "]"},
		{"flooders", "0"},
		{"server-cmd", "[]"},
		{"secret", ""},
		{"quiet", "false"},
		{"recipients", strconv.Itoa(def.Recipients)},
		{"label", ""},
		{"protocol", "3"},
		{"protocol-mix", ""},
		{"receive-maximum", "0"},
	}
	flags := newRunCmd(io.Discard, io.Discard).Flags()
	for _, tt := range tests {
		f := flags.Lookup(tt.flag)
		if f == nil {
			t.Errorf("no flag --%s", tt.flag)
			continue
		}
		if f.DefValue != tt.want {
			t.Errorf("--%s defaults to %q, want %q", tt.flag, f.DefValue, tt.want)
		}
	}
}

// TestCompareOneSided compares a report with nothing ("-"), in either
// column: the other column shows "–".
func TestCompareOneSided(t *testing.T) {
	path := filepath.Join(t.TempDir(), "restart.json")
	rep := &loadtest.Report{Scenario: loadtest.ScenarioRestart, Settings: loadtest.Settings{Messages: 10},
		Restart: &loadtest.RestartResult{Queued: 10, ReadySec: 0.5}}
	if err := rep.WriteJSON(path); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		want string
	}{
		{[]string{path, "-"}, "| restart, 10 queued | new process start → MQTT port accepts (s) | 0.50 | – | – |"},
		{[]string{"-", path}, "| restart, 10 queued | new process start → MQTT port accepts (s) | – | 0.50 | – |"},
	}
	for _, tt := range tests {
		var stdout bytes.Buffer
		cmd := newRootCmd(&stdout, io.Discard)
		cmd.SetArgs(append([]string{"compare", "--ours", "chatd", "--theirs", "mosquitto"}, tt.args...))
		if err := cmd.ExecuteContext(context.Background()); err != nil {
			t.Fatalf("compare %v: %v", tt.args, err)
		}
		if !strings.Contains(stdout.String(), tt.want) {
			t.Errorf("compare %v lacks %q:\n%s", tt.args, tt.want, stdout.String())
		}
	}
}

// TestUseWorkload: a workload file sets the users and the duration, unless
// the command line does.
func TestUseWorkload(t *testing.T) {
	tests := []struct {
		args      []string
		users     int
		durationS float64
	}{
		{nil, 1000, 600},
		{[]string{"--users", "50"}, 50, 600},
		{[]string{"--duration", "30s"}, 1000, 30},
	}
	for _, tt := range tests {
		cfg := loadtest.DefaultConfig()
		flags := pflag.NewFlagSet("run", pflag.ContinueOnError)
		flags.IntVar(&cfg.Users, "users", cfg.Users, "")
		flags.DurationVar(&cfg.Duration, "duration", cfg.Duration, "")
		if err := flags.Parse(tt.args); err != nil {
			t.Fatal(err)
		}
		if err := useWorkload(&cfg, "new-year", flags); err != nil {
			t.Fatal(err)
		}
		if cfg.Workload == nil || cfg.Users != tt.users || cfg.Duration.Seconds() != tt.durationS {
			t.Errorf("%v: users %d, duration %s; want %d, %gs", tt.args, cfg.Users, cfg.Duration, tt.users, tt.durationS)
		}
	}
}
