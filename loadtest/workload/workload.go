// Package workload describes a chat app's traffic as a YAML file: how
// users come and go, and what an online user does next, in what
// proportions, phase by phase. The load tester's workload scenario plays
// it against a chat server.
package workload

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Actions an online user takes, by the names of Mix's keys.
const (
	DM     = "dm"
	Group  = "group"
	Read   = "read"
	Typing = "typing"
	Media  = "media"
)

// ActionNames lists every action in report order.
var ActionNames = []string{DM, Group, Read, Typing, Media}

// Spec is one workload.
type Spec struct {
	// Name names the workload in reports.
	Name string `yaml:"name"`
	// About says what the workload models and where its figures come from.
	About string `yaml:"about"`
	// Users is how many users it runs unless --users says otherwise.
	Users int `yaml:"users"`
	// Duration is how long it runs unless --duration says otherwise.
	Duration time.Duration `yaml:"duration"`
	// Contacts is each user's contacts: who its direct messages go to.
	Contacts int `yaml:"contacts"`
	// PresenceWatch is how many of its contacts' presence a user watches
	// while online.
	PresenceWatch int `yaml:"presence_watch"`
	// MessageSize is the bytes of text in each message.
	MessageSize int `yaml:"message_size"`
	// MediaSize is the bytes of each media upload.
	MediaSize int `yaml:"media_size"`
	// Groups says how many groups there are and how large.
	Groups Groups `yaml:"groups"`
	// Phases are the parts of the run, in order; each inherits what it
	// leaves out from the one before.
	Phases []Phase `yaml:"phases"`
}

// Groups sizes the groups created before the run.
type Groups struct {
	// Size is the members of each group.
	Size int `yaml:"size"`
	// PerUser is how many groups a user is in on average.
	PerUser float64 `yaml:"per_user"`
}

// Count returns how many groups of Size members give users PerUser groups each.
func (g Groups) Count(users int) int {
	if g.Size < 2 || g.PerUser <= 0 {
		return 0
	}
	return max(1, int(math.Round(float64(users)*g.PerUser/float64(g.Size))))
}

// Phase is a stretch of the run with its own behaviour.
type Phase struct {
	// Name names the phase in the report.
	Name string `yaml:"name"`
	// Share is the fraction of the run's duration the phase lasts; the
	// shares add up to 1.
	Share float64 `yaml:"share"`
	// Session is the mean time a user stays online (exponential).
	Session time.Duration `yaml:"session"`
	// Offline is the mean time a user stays away between sessions
	// (exponential). Session/(Session+Offline) of the users are online.
	Offline time.Duration `yaml:"offline"`
	// Think is the mean time between an online user's actions (exponential).
	Think time.Duration `yaml:"think"`
	// Mix weighs the actions by name (dm, group, read, typing, media).
	Mix map[string]float64 `yaml:"mix"`
}

// Online returns the fraction of users online in the phase's steady state.
func (p Phase) Online() float64 {
	return float64(p.Session) / float64(p.Session+p.Offline)
}

// Weight returns the mix's weight of action, 0 when absent.
func (p Phase) Weight(action string) float64 { return p.Mix[action] }

// Pick returns the action that u, uniform in [0,1), falls on in the mix.
func (p Phase) Pick(u float64) string {
	total := 0.0
	for _, a := range ActionNames {
		total += p.Mix[a]
	}
	x := u * total
	last := ""
	for _, a := range ActionNames {
		w := p.Mix[a]
		if w <= 0 {
			continue
		}
		last = a
		if x < w {
			return a
		}
		x -= w
	}
	return last
}

// Uses reports whether any phase ever takes action.
func (s *Spec) Uses(action string) bool {
	return slices.ContainsFunc(s.Phases, func(p Phase) bool { return p.Mix[action] > 0 })
}

//go:embed workloads/*.yaml
var shipped embed.FS

// Shipped lists the names of the workloads built into the load tester.
func Shipped() []string {
	entries, err := fs.ReadDir(shipped, "workloads")
	if err != nil {
		return nil
	}
	var names []string
	for _, e := range entries {
		names = append(names, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	return names
}

// Load reads the workload named: one of Shipped, or a YAML file's path.
func Load(name string) (*Spec, error) {
	if slices.Contains(Shipped(), name) {
		b, err := shipped.ReadFile(path.Join("workloads", name+".yaml"))
		if err != nil {
			return nil, fmt.Errorf("workload %s: %w", name, err)
		}
		return Parse(b)
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("workload: %w (the built-in ones are %s)", err, strings.Join(Shipped(), ", "))
	}
	s, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return s, nil
}

// Parse reads a workload from YAML, fills each phase's gaps from the
// phase before, and validates it. Unknown keys are errors: a misspelt
// key would otherwise run a different workload than the one meant.
func Parse(b []byte) (*Spec, error) {
	var s Spec
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("workload: %w", err)
	}
	for i := range s.Phases {
		p := &s.Phases[i]
		if p.Name == "" {
			p.Name = fmt.Sprintf("phase %d", i+1)
		}
		if i == 0 {
			continue
		}
		prev := s.Phases[i-1]
		if p.Session == 0 {
			p.Session = prev.Session
		}
		if p.Offline == 0 {
			p.Offline = prev.Offline
		}
		if p.Think == 0 {
			p.Think = prev.Think
		}
		if len(p.Mix) == 0 {
			p.Mix = prev.Mix
		}
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// Validate reports the first setting that cannot work.
func (s *Spec) Validate() error {
	switch {
	case s.Name == "":
		return errors.New("workload: no name")
	case s.Users < 0, s.Duration < 0:
		return errors.New("workload: users and duration must not be negative")
	case s.Contacts < 1:
		return errors.New("workload: contacts must be at least 1")
	case s.PresenceWatch < 0 || s.PresenceWatch > s.Contacts:
		return errors.New("workload: presence_watch must be 0 to contacts")
	case s.MessageSize < 0 || s.MessageSize > 60_000:
		return errors.New("workload: message_size must be 0 to 60000 bytes")
	case len(s.Phases) == 0:
		return errors.New("workload: no phases")
	}
	share := 0.0
	for _, p := range s.Phases {
		if p.Share <= 0 {
			return fmt.Errorf("workload: phase %q: share must be above 0", p.Name)
		}
		share += p.Share
		if p.Session <= 0 || p.Offline < 0 || p.Think <= 0 {
			return fmt.Errorf("workload: phase %q: session and think must be above 0, offline not negative", p.Name)
		}
		total := 0.0
		for a, w := range p.Mix {
			if !slices.Contains(ActionNames, a) {
				return fmt.Errorf("workload: phase %q: unknown action %q (one of %s)", p.Name, a, strings.Join(ActionNames, ", "))
			}
			if w < 0 {
				return fmt.Errorf("workload: phase %q: weight of %s is negative", p.Name, a)
			}
			total += w
		}
		if total <= 0 {
			return fmt.Errorf("workload: phase %q: the mix weighs nothing", p.Name)
		}
	}
	if math.Abs(share-1) > 1e-6 {
		return fmt.Errorf("workload: the phases' shares add up to %g, not 1", share)
	}
	if s.Uses(Group) && (s.Groups.Size < 2 || s.Groups.PerUser <= 0) {
		return errors.New("workload: group messages need groups: size of at least 2 and per_user above 0")
	}
	if s.Uses(Media) && (s.MediaSize < 1 || s.MediaSize > 64<<20) {
		return errors.New("workload: media uploads need media_size of 1 byte to 64 MiB")
	}
	return nil
}

// Bounds returns when each phase starts and ends within a run of d.
func (s *Spec) Bounds(d time.Duration) []time.Duration {
	out := make([]time.Duration, len(s.Phases)+1)
	acc := 0.0
	for i, p := range s.Phases {
		acc += p.Share
		out[i+1] = time.Duration(acc * float64(d))
	}
	out[len(s.Phases)] = d
	return out
}
