// Package deploy_test checks the deployment artifacts under deploy/ against
// the server they describe: the Grafana dashboards and the Prometheus
// alerting rules may only use metrics a running chatd really exposes, since
// a renamed or removed metric would otherwise leave an empty panel or an
// alert that can never fire, and nobody would notice until an outage.
package deploy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/chatd/chatd/internal/chatdtest"

	paho "github.com/eclipse/paho.mqtt.golang"
	"go.uber.org/goleak"
	"go.yaml.in/yaml/v3"

	"github.com/chatd/chatd/broker/protocol/token"
	"github.com/chatd/chatd/config"
	"github.com/chatd/chatd/internal/testutil"
)

// TestMain fails the package if a test leaves a goroutine behind: the
// server started here must close completely, paho client included.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The artifacts, relative to this package's directory (go test's working
// directory).
var (
	dashboards  = []string{"grafana/chatd-node.json", "grafana/chatd-cluster.json"}
	alertsFile  = "prometheus/alerts.yml"
	alertsTests = "prometheus/alerts_test.yml"
)

// metricName finds metric names in PromQL. chatd's own metrics start with
// chatd_; go_ and process_ are the Go and process collectors the server
// registers beside them. Prometheus' own up is not the server's to expose.
var metricName = regexp.MustCompile(`\b(?:chatd|go|process)_[a-z0-9_]+`)

// webhookMatcher finds a webhook label's value, in a PromQL matcher or an
// exposed sample alike: the dashboards and alerts name the webhooks (push,
// events, bots) that the server registers by name.
var webhookMatcher = regexp.MustCompile(`\bwebhook="([a-z0-9_]+)"`)

// dashboard is the part of a Grafana dashboard JSON model the tests read.
type dashboard struct {
	UID           string  `json:"uid"`
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Inputs        []struct {
		Name, Type, PluginID string
	} `json:"__inputs"`
	Templating struct {
		List []struct {
			Name, Type string
		} `json:"list"`
	} `json:"templating"`
}

// panel is one panel, or a row holding panels when collapsed.
type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

// ruleFile is a Prometheus 2 rule file. Decoding it with KnownFields
// catches a misspelt key (annotation:, label:) that Prometheus would
// reject at load time.
type ruleFile struct {
	Groups []struct {
		Name     string `yaml:"name"`
		Interval string `yaml:"interval"`
		Rules    []rule `yaml:"rules"`
	} `yaml:"groups"`
}

// rule is one alerting (or recording) rule.
type rule struct {
	Alert         string            `yaml:"alert"`
	Record        string            `yaml:"record"`
	Expr          string            `yaml:"expr"`
	For           string            `yaml:"for"`
	KeepFiringFor string            `yaml:"keep_firing_for"`
	Labels        map[string]string `yaml:"labels"`
	Annotations   map[string]string `yaml:"annotations"`
}

func readDashboard(t *testing.T, path string) dashboard {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return d
}

func readRules(t *testing.T) ruleFile {
	t.Helper()
	b, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	var f ruleFile
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	return f
}

// leaves returns the panels that show data: a row's own entry is only a
// heading, and a collapsed row keeps its panels inside it.
func leaves(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		if p.Type == "row" {
			out = append(out, leaves(p.Panels)...)
			continue
		}
		out = append(out, p)
	}
	return out
}

// TestDashboards checks what Grafana needs to import and show each
// dashboard: a title on every panel, at least one query each, queries on
// the DS_PROMETHEUS data source and filtered by the instance variable.
func TestDashboards(t *testing.T) {
	for _, tc := range []struct {
		path, uid string
	}{
		{dashboards[0], "chatd-node"},
		{dashboards[1], "chatd-cluster"},
	} {
		t.Run(filepath.Base(tc.path), func(t *testing.T) {
			d := readDashboard(t, tc.path)
			if d.UID != tc.uid || d.Title == "" {
				t.Errorf("uid %q title %q, want uid %q and a title", d.UID, d.Title, tc.uid)
			}
			if d.SchemaVersion < 36 {
				t.Errorf("schemaVersion %d: panels' datasource objects need 36 or later", d.SchemaVersion)
			}
			if !slices.ContainsFunc(d.Inputs, func(in struct{ Name, Type, PluginID string }) bool {
				return in.Name == "DS_PROMETHEUS" && in.Type == "datasource" && in.PluginID == "prometheus"
			}) {
				t.Error("no DS_PROMETHEUS datasource input: importing the dashboard would not ask for the data source")
			}
			vars := map[string]string{}
			for _, v := range d.Templating.List {
				vars[v.Name] = v.Type
			}
			if vars["DS_PROMETHEUS"] != "datasource" || vars["instance"] != "query" {
				t.Errorf("template variables %v, want DS_PROMETHEUS (datasource) and instance (query)", vars)
			}
			ids := map[int]string{}
			var rows []panel
			for _, p := range d.Panels {
				if p.Type == "row" {
					rows = append(rows, p)
				}
			}
			for _, r := range rows {
				if r.Title == "" {
					t.Errorf("row %d has no title", r.ID)
				}
			}
			for _, p := range append(leaves(d.Panels), rows...) {
				if prev, dup := ids[p.ID]; dup {
					t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
				}
				ids[p.ID] = p.Title
			}
			for _, p := range leaves(d.Panels) {
				if p.Title == "" {
					t.Errorf("panel %d (%s) has no title", p.ID, p.Type)
				}
				if len(p.Targets) == 0 {
					t.Errorf("panel %q has no target", p.Title)
				}
				if p.Datasource.UID != "${DS_PROMETHEUS}" {
					t.Errorf("panel %q: data source %q, want ${DS_PROMETHEUS}", p.Title, p.Datasource.UID)
				}
				for _, tg := range p.Targets {
					if strings.TrimSpace(tg.Expr) == "" {
						t.Errorf("panel %q: target %s has no expr", p.Title, tg.RefID)
					}
					// A query without the filter would sum every node
					// into the one picked.
					if !strings.Contains(tg.Expr, "$instance") {
						t.Errorf("panel %q: %s ignores the instance variable", p.Title, tg.Expr)
					}
				}
			}
		})
	}
}

// TestAlertRules checks what an on-call engineer relies on in every alert:
// a pending period, a severity to route by, and text that says what broke
// and where the runbook is.
func TestAlertRules(t *testing.T) {
	f := readRules(t)
	runbook := regexp.MustCompile(`^docs/operations\.md#[a-z0-9-]+$`)
	seen := map[string]bool{}
	n := 0
	for _, g := range f.Groups {
		if g.Name == "" {
			t.Error("a group has no name")
		}
		for _, r := range g.Rules {
			n++
			t.Run(r.Alert, func(t *testing.T) {
				if r.Alert == "" || r.Record != "" {
					t.Fatalf("group %s: rule %q is not an alerting rule", g.Name, r.Expr)
				}
				if seen[r.Alert] {
					t.Errorf("alert %s defined twice", r.Alert)
				}
				seen[r.Alert] = true
				if strings.TrimSpace(r.Expr) == "" {
					t.Error("no expr")
				}
				// A for: keeps one bad scrape from paging anyone.
				if d, err := time.ParseDuration(r.For); err != nil || d <= 0 {
					t.Errorf("for: %q, want a positive duration", r.For)
				}
				if s := r.Labels["severity"]; s != "critical" && s != "warning" && s != "info" {
					t.Errorf("severity %q, want critical, warning or info", s)
				}
				for _, a := range []string{"summary", "description"} {
					if strings.TrimSpace(r.Annotations[a]) == "" {
						t.Errorf("no %s annotation", a)
					}
				}
				if !runbook.MatchString(r.Annotations["runbook"]) {
					t.Errorf("runbook %q, want docs/operations.md#<anchor>", r.Annotations["runbook"])
				}
			})
		}
	}
	if n == 0 {
		t.Fatal("no rules")
	}
}

// TestPromtool has Prometheus' own tool validate the rules (PromQL syntax,
// templates) and run their unit tests, and parse the dashboards' queries
// too, handed to it as recording rules. promtool is required rather than
// skipped when missing, so that an unchecked rule file cannot pass.
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool is not on PATH: run apt-get install prometheus (Debian's package ships /usr/bin/promtool)")
	}
	abs := func(path string) string {
		p, err := filepath.Abs(path)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"check rules", []string{"check", "rules", abs(alertsFile)}},
		{"test rules", []string{"test", "rules", abs(alertsTests)}},
		{"dashboard queries", []string{"check", "rules", dashboardRules(t)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, promtool, tc.args...).CombinedOutput()
			if err != nil {
				t.Fatalf("promtool %s: %v\n%s", strings.Join(tc.args, " "), err, out)
			}
		})
	}
}

// dashboardRules writes the dashboards' queries as recording rules, with
// Grafana's variables replaced by values, so that promtool parses them: a
// syntax error in a panel would otherwise show only as an error in the
// panel, once someone looks at it. It returns the file's path.
func dashboardRules(t *testing.T) string {
	t.Helper()
	grafana := strings.NewReplacer("$__rate_interval", "1m", "$instance", "n1:8080", "$job", "chatd")
	var rules []map[string]string
	for _, path := range dashboards {
		for _, p := range leaves(readDashboard(t, path).Panels) {
			for _, tg := range p.Targets {
				rules = append(rules, map[string]string{
					// A metric name: no hyphen, so chatd_node rather than chatd-node.
					"record": fmt.Sprintf("dashboard:%s:panel%d_%s", strings.ReplaceAll(strings.TrimSuffix(filepath.Base(path), ".json"), "-", "_"), p.ID, tg.RefID),
					"expr":   grafana.Replace(tg.Expr),
				})
			}
		}
	}
	b, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboards", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dashboards.yml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestMetricsExist runs a real chatd, has it store, deliver and refuse a
// message and end a connection, so that the labelled metrics have series,
// and fails on any metric the dashboards or the alerts use that its
// /metrics does not expose, or any webhook they name that it does not
// count.
func TestMetricsExist(t *testing.T) {
	used := map[string][]string{}     // metric name → the files using it
	webhooks := map[string][]string{} // webhook label value → the files using it
	note := func(path, q string) {
		for _, m := range metricName.FindAllString(q, -1) {
			used[m] = appendOnce(used[m], path)
		}
		for _, m := range webhookMatcher.FindAllStringSubmatch(q, -1) {
			webhooks[m[1]] = appendOnce(webhooks[m[1]], path)
		}
	}
	for _, path := range dashboards {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(b, &v); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		for _, q := range queries(v) {
			note(path, q)
		}
	}
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			note(alertsFile, r.Expr)
		}
	}
	if len(used) == 0 {
		t.Fatal("no metric names found in the dashboards and alerts")
	}

	addr := startChatd(t)
	var got exposition
	var missing []string
	// The disconnect is counted when mochi reports it, after the client
	// has gone; scrape until every family is there or the deadline passes.
	err := testutil.Poll(10*time.Second, func() error {
		var err error
		if got, err = scrape(addr); err != nil {
			return err
		}
		missing = missing[:0]
		for m := range used {
			if !got.exposed(m) {
				missing = append(missing, m)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("not exposed: %v", missing)
		}
		return nil
	})
	if err != nil {
		sort.Strings(missing)
		for _, m := range missing {
			t.Errorf("%s, used in %s, is not exposed by chatd's /metrics", m, strings.Join(used[m], ", "))
		}
		if len(missing) == 0 {
			t.Error(err)
		}
		return
	}
	for w, paths := range webhooks {
		if !got.webhooks[w] {
			t.Errorf("webhook=%q, used in %s, is no chatd_webhook_* series' label (chatd has %v)", w, strings.Join(paths, ", "), got.webhooks)
		}
	}
	if t.Failed() {
		return
	}
	names := make([]string, 0, len(used))
	for m := range used {
		names = append(names, m)
	}
	sort.Strings(names)
	t.Logf("%d metric names used, all exposed: %s", len(names), strings.Join(names, " "))
}

// queries returns the PromQL in a dashboard: targets' expr, and template
// variables' definitions and queries (label_values(chatd_connections, ...)).
func queries(v any) []string {
	var out []string
	switch v := v.(type) {
	case map[string]any:
		for k, x := range v {
			if s, ok := x.(string); ok && (k == "expr" || k == "definition" || k == "query") {
				out = append(out, s)
				continue
			}
			out = append(out, queries(x)...)
		}
	case []any:
		for _, x := range v {
			out = append(out, queries(x)...)
		}
	}
	return out
}

// appendOnce appends v to s unless s holds it already.
func appendOnce(s []string, v string) []string {
	if slices.Contains(s, v) {
		return s
	}
	return append(s, v)
}

// exposition is what a scrape of /metrics declared.
type exposition struct {
	// types holds each family's type by name, from its # TYPE line.
	types map[string]string
	// webhooks holds the webhook label values of chatd_webhook_* samples.
	webhooks map[string]bool
}

// exposed reports whether the scrape declared the family of name: the
// name itself, or a histogram's or summary's _bucket, _sum or _count
// series. The # TYPE lines are what count, not samples: a family with no
// sample yet is still a metric the server has.
func (e exposition) exposed(name string) bool {
	if _, ok := e.types[name]; ok {
		return true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		switch e.types[base] {
		case "histogram":
			return true
		case "summary":
			return suffix != "_bucket"
		}
	}
	return false
}

// scrape GETs /metrics in the text format (no Accept header: OpenMetrics
// would name counters' families without _total) and reads its families'
// types and its webhooks.
func scrape(addr string) (exposition, error) {
	e := exposition{types: map[string]string{}, webhooks: map[string]bool{}}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return e, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return e, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if f := strings.Fields(line); len(f) == 4 && f[0] == "#" && f[1] == "TYPE" {
			e.types[f[2]] = f[3]
			continue
		}
		if strings.HasPrefix(line, "chatd_webhook_") {
			if m := webhookMatcher.FindStringSubmatch(line); m != nil {
				e.webhooks[m[1]] = true
			}
		}
	}
	if err := sc.Err(); err != nil {
		return e, err
	}
	if len(e.types) == 0 {
		return e, errors.New("GET /metrics: no # TYPE lines")
	}
	return e, nil
}

// startChatd starts a chatd on loopback and makes it do the work that gives
// the labelled metrics a series: alice sends herself a message and reads
// it, sends a payload that is not JSON (a bad_payload refusal), and
// disconnects (a disconnect with reason client). It returns the HTTP
// listener's address; the server closes when the test ends.
func startChatd(t *testing.T) string {
	t.Helper()
	secret := []byte(strings.Repeat("s", 32))
	// A cluster node of one, so that the cluster's metrics are there too.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	natsAddr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	s := chatdtest.Start(t, secret, func(cfg *config.Config) {
		cfg.Cluster.Enabled, cfg.Cluster.Node, cfg.Cluster.NATSListen = true, "n1", natsAddr
		cfg.Cluster.Replicas, cfg.Cluster.Shards = 1, 1
	})

	tok, err := token.Mint(secret, "alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 16)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + s.MQTTAddr()).
		SetClientID("alice/metrics").SetUsername("alice").SetPassword(tok).
		SetCleanSession(false).SetAutoReconnect(false))
	wait := func(what string, tk paho.Token) {
		t.Helper()
		if !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("%s: %v", what, tk.Error())
		}
	}
	wait("connect", c.Connect())
	connected := true
	defer func() {
		if connected {
			c.Disconnect(100)
		}
	}()
	wait("subscribe", c.Subscribe("inbox/alice", 1, func(_ paho.Client, m paho.Message) { got <- m.Payload() }))
	for _, tc := range []struct {
		payload string
		want    func(kind, id, code string) bool
	}{
		{`{"id":"m-1"}`, func(kind, id, _ string) bool { return kind == "msg" && id == "m-1" }},
		{`not json`, func(kind, _, code string) bool { return kind == "error" && code == "bad_payload" }},
	} {
		wait("publish "+tc.payload, c.Publish("inbox/alice", 1, false, tc.payload))
		deadline := time.After(10 * time.Second)
		for done := false; !done; {
			select {
			case p := <-got:
				var e struct {
					Kind, Code string
					Msg        struct{ ID string }
				}
				if err := json.Unmarshal(p, &e); err != nil {
					t.Fatalf("%s: %v", p, err)
				}
				done = tc.want(e.Kind, e.Msg.ID, e.Code)
			case <-deadline:
				t.Fatalf("published %s: alice did not get what it should in 10s", tc.payload)
			}
		}
	}
	c.Disconnect(250)
	connected = false
	return s.HTTPAddr()
}
