package workload

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

const valid = `
name: t
users: 10
duration: 1m
contacts: 3
presence_watch: 2
message_size: 10
media_size: 100
groups: {size: 3, per_user: 1}
phases:
  - name: a
    share: 0.5
    session: 1m
    offline: 3m
    think: 10s
    mix: {dm: 1, group: 1, read: 1, typing: 1, media: 1}
  - share: 0.5
    think: 1s
`

func TestParse(t *testing.T) {
	s, err := Parse([]byte(valid))
	if err != nil {
		t.Fatal(err)
	}
	b := s.Phases[1]
	// The second phase inherits what it leaves out.
	if b.Name != "phase 2" || b.Session != time.Minute || b.Offline != 3*time.Minute || b.Think != time.Second || b.Mix["media"] != 1 {
		t.Fatalf("second phase %+v", b)
	}
	if got := s.Phases[0].Online(); got != 0.25 {
		t.Fatalf("online %v, want 0.25", got)
	}
	if got := s.Bounds(10 * time.Second); got[0] != 0 || got[1] != 5*time.Second || got[2] != 10*time.Second {
		t.Fatalf("bounds %v", got)
	}
	if got := s.Groups.Count(10); got != 3 {
		t.Fatalf("groups %d, want 3 (10 users in 1 group each of 3)", got)
	}
}

func TestParseRefuses(t *testing.T) {
	tests := []struct {
		name, from, to, want string
	}{
		{"unknown key", "contacts: 3", "contacts: 3\ncontact: 3", "field contact not found"},
		{"no name", "name: t", "", "no name"},
		{"unknown action", "typing: 1,", "typo: 1,", `unknown action "typo"`},
		{"negative weight", "dm: 1,", "dm: -1,", "negative"},
		{"shares", "  - share: 0.5", "  - share: 0.4", "add up to 0.9"},
		{"no think", "think: 10s", "think: 0s", "think must be above 0"},
		{"groups without size", "groups: {size: 3, per_user: 1}", "", "group messages need groups"},
		{"media without size", "media_size: 100", "", "media_size"},
		{"watch beyond contacts", "presence_watch: 2", "presence_watch: 4", "presence_watch"},
		{"not YAML", "name: t", "name: [", "workload:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !strings.Contains(valid, tt.from) {
				t.Fatalf("%q is not in the valid workload", tt.from)
			}
			_, err := Parse([]byte(strings.Replace(valid, tt.from, tt.to, 1)))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// TestPick: the actions are drawn in the proportions of their weights.
func TestPick(t *testing.T) {
	p := Phase{Mix: map[string]float64{DM: 6, Group: 3, Media: 1}}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	const n = 100_000
	got := map[string]int{}
	for range n {
		got[p.Pick(rng.Float64())]++
	}
	for a, w := range map[string]float64{DM: 0.6, Group: 0.3, Media: 0.1, Read: 0, Typing: 0} {
		// Five standard deviations of a binomial share.
		if share := float64(got[a]) / n; math.Abs(share-w) > 5*math.Sqrt(w*(1-w)/n)+1e-9 {
			t.Errorf("%s drawn %.4f of the time, want %.2f", a, share, w)
		}
	}
	if p.Pick(0) != DM || p.Pick(0.9999) != Media {
		t.Fatalf("edges: %s %s", p.Pick(0), p.Pick(0.9999))
	}
}

// TestShipped: the built-in workloads load, and their figures are the
// ones their descriptions and docs/workloads.md derive.
func TestShipped(t *testing.T) {
	if got := strings.Join(Shipped(), ","); got != "new-year,quiet-evening" {
		t.Fatalf("shipped %s", got)
	}
	// messages per online user per hour, and media's share of messages
	rates := func(p Phase) (perOnlineHour, media float64) {
		total := 0.0
		for _, w := range p.Mix {
			total += w
		}
		msgs := p.Mix[DM] + p.Mix[Group] + p.Mix[Media]
		return time.Hour.Seconds() / p.Think.Seconds() * msgs / total, p.Mix[Media] / msgs
	}
	evening, err := Load("quiet-evening")
	if err != nil {
		t.Fatal(err)
	}
	e := evening.Phases[0]
	perOnline, media := rates(e)
	perUser := perOnline * e.Online()
	if math.Abs(e.Online()-0.2) > 1e-9 || math.Abs(perUser-4.8) > 0.05 || math.Abs(media-0.1) > 0.005 {
		t.Errorf("quiet evening: %.2f online, %.2f messages per user per hour, media %.3f; want 0.2, 4.8, 0.1", e.Online(), perUser, media)
	}
	ny, err := Load("new-year")
	if err != nil {
		t.Fatal(err)
	}
	if len(ny.Phases) != 3 || ny.Phases[1].Name != "midnight" {
		t.Fatalf("new year phases %+v", ny.Phases)
	}
	m := ny.Phases[1]
	perOnline, media = rates(m)
	ratio := perOnline * m.Online() / perUser
	if math.Abs(m.Online()-0.833) > 0.001 || math.Abs(ratio-13) > 0.7 || math.Abs(media-0.235) > 0.005 {
		t.Errorf("midnight: %.3f online, %.1f times the evening's messages per user, media %.3f; want 0.833, 13, 0.235", m.Online(), ratio, media)
	}
	if _, err := Load("no-such-workload"); err == nil || !strings.Contains(err.Error(), "new-year, quiet-evening") {
		t.Fatalf("unknown workload: %v", err)
	}
}
