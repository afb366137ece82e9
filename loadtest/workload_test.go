package loadtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/chatdtest"
	"github.com/chatd/chatd/loadtest/workload"
)

// startChatdAPI runs chatd in-process with its HTTP API on loopback and
// returns its broker URL and API base URL.
func startChatdAPI(t *testing.T) (mqttURL, api string) {
	t.Helper()
	s := chatdtest.Start(t, testSecret, nil)
	return "tcp://" + s.MQTTAddr(), "http://" + s.HTTPAddr()
}

// busyDay is a workload where every user comes and goes every couple of
// seconds and acts several times a second: every action, many sessions
// and presence changes within a short test.
const busyDay = `
name: busy
contacts: 5
presence_watch: 3
message_size: 20
media_size: 2000
groups: {size: 4, per_user: 1}
phases:
  - name: warm
    share: 0.5
    session: 1500ms
    offline: 700ms
    think: 150ms
    mix: {dm: 4, group: 3, read: 3, typing: 2, media: 1}
  - name: burst
    share: 0.5
    offline: 300ms
    think: 60ms
`

// TestRunWorkload plays a workload against a real chatd: every kind of
// action happens, everything PUBACKed arrives at each of its recipients
// (offline ones once they are back), in order, and every read receipt
// reaches the sender of what was read.
func TestRunWorkload(t *testing.T) {
	broker, api := startChatdAPI(t)
	spec, err := workload.Parse([]byte(busyDay))
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(ScenarioWorkload, broker)
	cfg.Workload, cfg.API = spec, api
	cfg.Users, cfg.Duration = 16, 3*time.Second
	rep := runOK(t, cfg)
	assertWorkload(t, rep)
	wl := rep.Workload
	for _, a := range workload.ActionNames {
		if wl.Actions[a].Count == 0 {
			t.Errorf("no %s action in %+v", a, wl.Actions)
		}
	}
	if g := wl.Actions[workload.Group]; g.Delivered < 2*g.Acked {
		t.Errorf("group messages: %d delivered for %d sent to groups of 4", g.Delivered, g.Acked)
	}
	for _, a := range []string{workload.DM, workload.Group, workload.Media} {
		if r := wl.Actions[a]; r.ToOffline == 0 || r.Deliver.Count == 0 {
			t.Errorf("%s: %d to offline users, %d latencies to online ones: want both", a, r.ToOffline, r.Deliver.Count)
		}
	}
	if r := wl.Actions[workload.Read]; r.Delivered == 0 {
		t.Errorf("no read receipt arrived: %+v", r)
	}
	if r := wl.Actions[workload.Typing]; r.Received == 0 {
		t.Errorf("no typing signal arrived: %+v", r)
	}
	if m := wl.Actions[workload.Media]; m.Upload == nil || m.Upload.Count != m.Sent {
		t.Errorf("media: %d messages, uploads %+v", m.Sent, m.Upload)
	}
	if wl.Sessions.Connects <= int64(cfg.Users) || wl.Sessions.Disconnects == 0 || wl.Sessions.Failed != 0 {
		t.Errorf("sessions %+v: want users coming and going", wl.Sessions)
	}
	if wl.Presence.Events == 0 || wl.Presence.Latency.Count == 0 {
		t.Errorf("presence %+v: watchers saw nothing", wl.Presence)
	}
	if wl.Groups != 4 || len(wl.Phases) != 2 || wl.Phases[1].Name != "burst" {
		t.Errorf("workload %+v", wl)
	}

	// Every figure is a threshold's, and the reports show the actions.
	th, err := ParseThreshold("workload.actions.group.lost==0")
	if err != nil {
		t.Fatal(err)
	}
	if v, err := Evaluate(rep, []Threshold{th}); err != nil || !v.Passed {
		t.Errorf("threshold: %+v %v", v, err)
	}
	var table strings.Builder
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	html := filepath.Join(t.TempDir(), "r.html")
	if err := rep.WriteHTML(html); err != nil {
		t.Fatal(err)
	}
	page, err := os.ReadFile(html)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"typing", "read", "media uploads", "presence"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table has no %q:\n%s", want, table.String())
		}
	}
	if !strings.Contains(string(page), "per action") || !strings.Contains(string(page), "<td>group</td>") {
		t.Errorf("HTML report has no per-action table")
	}
}

// TestRunShippedWorkloads runs each built-in workload, sped up, against
// a real chatd.
func TestRunShippedWorkloads(t *testing.T) {
	for _, name := range workload.Shipped() {
		t.Run(name, func(t *testing.T) {
			broker, api := startChatdAPI(t)
			spec, err := workload.Load(name)
			if err != nil {
				t.Fatal(err)
			}
			cfg := testConfig(ScenarioWorkload, broker)
			cfg.Workload, cfg.API = spec, api
			cfg.Users, cfg.Duration, cfg.Speed = 40, 3*time.Second, 60
			rep := runOK(t, cfg)
			assertWorkload(t, rep)
			if rep.Counts.Sent == 0 || rep.Workload.Sessions.Connects == 0 {
				t.Errorf("nothing happened: %+v", rep.Workload)
			}
		})
	}
}

// assertWorkload checks a workload run's accounting: each action's
// deliveries owed were made, none lost or out of order, and the run
// passed.
func assertWorkload(t *testing.T, rep *Report) {
	t.Helper()
	if rep.Workload == nil {
		t.Fatal("no workload figures")
	}
	for name, a := range rep.Workload.Actions {
		if name == workload.Typing {
			continue
		}
		if a.Delivered+a.Lost != a.Expected || a.Lost != 0 || a.OrderViolations != 0 || a.Failed != 0 {
			t.Errorf("%s: delivered %d + lost %d != owed %d, or order violations %d, failed %d", name, a.Delivered, a.Lost, a.Expected, a.OrderViolations, a.Failed)
		}
		if a.Sent != a.Acked {
			t.Errorf("%s: sent %d, PUBACKed %d", name, a.Sent, a.Acked)
		}
	}
	if code := rep.ExitCode(); code != 0 {
		t.Errorf("exit code %d: %v; errors %q", code, rep.Failures(), rep.Errors)
	}
}
