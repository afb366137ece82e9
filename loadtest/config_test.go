package loadtest

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	valid := func() Config {
		c := DefaultConfig()
		c.Secret = []byte("s")
		return c
	}
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string // "" for valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"plain needs no secret", func(c *Config) { c.Plain, c.Secret = true, nil }, ""},
		{"websocket broker", func(c *Config) { c.Broker = "ws://127.0.0.1:8080/mqtt" }, ""},
		{"unknown scenario", func(c *Config) { c.Scenario = "gossip" }, "unknown scenario"},
		{"no secret", func(c *Config) { c.Secret = nil }, "secret"},
		{"bad scheme", func(c *Config) { c.Broker = "http://127.0.0.1:1883" }, "scheme"},
		{"no host", func(c *Config) { c.Broker = "tcp://" }, "host"},
		{"topic without %s", func(c *Config) { c.Topic = "inbox" }, "topic"},
		{"bad user prefix", func(c *Config) { c.UserPrefix = "a b" }, "user prefix"},
		{"one user cannot chat", func(c *Config) { c.Users = 1 }, "--users"},
		{"zero duration", func(c *Config) { c.Duration = 0 }, "--duration"},
		{"negative rate", func(c *Config) { c.Rate = -1 }, "--rate"},
		{"zero inflight", func(c *Config) { c.Inflight = 0 }, "--inflight"},
		{"drain needs messages", func(c *Config) { c.Scenario, c.Messages = ScenarioDrain, 0 }, "--messages"},
		{"crash needs a server command", func(c *Config) { c.Scenario = ScenarioCrash }, "--server-cmd"},
		{"unknown cut", func(c *Config) { c.Scenario, c.Cuts = ScenarioFlaky, []string{"meteor"} }, "--cuts"},
		{"pid and command", func(c *Config) { c.ServerPID, c.ServerCmd = 1, "x" }, "exclusive"},
		{"short keepalive", func(c *Config) { c.Keepalive = time.Millisecond }, "--keepalive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.mutate(&c)
			err := c.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("err = %v, want one mentioning %q", err, tt.wantErr)
			}
		})
	}
}

func TestSendInterval(t *testing.T) {
	tests := []struct {
		rate float64
		n    int
		want time.Duration
	}{
		{0, 10, 0},
		{100, 10, 100 * time.Millisecond},
		{1000, 1, time.Millisecond},
		{3, 1, 333333333},
	}
	for _, tt := range tests {
		if got := sendInterval(tt.rate, tt.n); got != tt.want {
			t.Errorf("sendInterval(%g, %d) = %s, want %s", tt.rate, tt.n, got, tt.want)
		}
	}
}
