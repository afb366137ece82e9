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
		{"plain with passwords", func(c *Config) { c.Plain, c.Username, c.Password = true, "acct-%s", "pw" }, ""},
		{"password without plain", func(c *Config) { c.Password = "pw" }, "--plain"},
		{"username with two %s", func(c *Config) { c.Plain, c.Username = true, "%s-%s" }, "at most one"},
		{"one user cannot chat", func(c *Config) { c.Users = 1 }, "--users"},
		{"zero duration", func(c *Config) { c.Duration = 0 }, "--duration"},
		{"negative rate", func(c *Config) { c.Rate = -1 }, "--rate"},
		{"zero inflight", func(c *Config) { c.Inflight = 0 }, "--inflight"},
		{"drain needs messages", func(c *Config) { c.Scenario, c.Messages = ScenarioDrain, 0 }, "--messages"},
		{"crash needs a server command", func(c *Config) { c.Scenario = ScenarioCrash }, "--server-cmd"},
		{"unknown cut", func(c *Config) { c.Scenario, c.Cuts = ScenarioFlaky, []string{"meteor"} }, "--cuts"},
		{"pid and command", func(c *Config) { c.ServerPID, c.ServerCmds = 1, []string{"x"} }, "exclusive"},
		{"empty command", func(c *Config) { c.ServerCmds = []string{" "} }, "empty command"},
		{"two brokers", func(c *Config) { c.Broker = "tcp://127.0.0.1:1883, tcp://127.0.0.1:1884" }, ""},
		{"one command per broker", func(c *Config) {
			c.Scenario, c.Broker, c.ServerCmds = ScenarioCrash, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884", []string{"a", "b"}
		}, ""},
		{"one command for two brokers", func(c *Config) {
			c.Scenario, c.Broker, c.ServerCmds = ScenarioCrash, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884", []string{"a"}
		}, ""},
		{"commands and brokers differ", func(c *Config) {
			c.Scenario, c.Broker, c.ServerCmds = ScenarioCrash, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884", []string{"a", "b", "c"}
		}, "3 times for 2"},
		{"empty broker in list", func(c *Config) { c.Broker = "tcp://127.0.0.1:1883,,tcp://127.0.0.1:1884" }, "empty URL"},
		{"broker listed twice", func(c *Config) { c.Broker = "tcp://127.0.0.1:1883,tcp://127.0.0.1:1883" }, "twice"},
		{"mixed schemes", func(c *Config) { c.Broker = "tcp://127.0.0.1:1883,ws://127.0.0.1:8080/mqtt" }, "one scheme"},
		{"bad second broker", func(c *Config) { c.Broker = "tcp://127.0.0.1:1883,tcp://" }, "host"},
		{"flaky with two brokers", func(c *Config) {
			c.Scenario, c.Broker = ScenarioFlaky, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884"
		}, "flaky"},
		{"short keepalive", func(c *Config) { c.Keepalive = time.Millisecond }, "--keepalive"},
		{"label", func(c *Config) { c.Label = "receipts on" }, ""},
		{"devices", func(c *Config) { c.Devices = MaxDevices }, ""},
		{"MQTT 5", func(c *Config) { c.Protocol = 5 }, ""},
		{"MQTT 5 over TLS", func(c *Config) { c.Protocol, c.Broker = 5, "tls://127.0.0.1:8883" }, ""},
		{"MQTT 5 receive maximum", func(c *Config) { c.Protocol, c.ReceiveMaximum = 5, 1 }, ""},
		{"MQTT 5 plain", func(c *Config) { c.Protocol, c.Plain, c.Secret = 5, true, nil }, ""},
		{"protocol 4", func(c *Config) { c.Protocol = 4 }, "--protocol 4"},
		{"MQTT 5 over WebSocket", func(c *Config) { c.Protocol, c.Broker = 5, "ws://127.0.0.1:8080/mqtt" }, ""},
		{"receive maximum for MQTT 3.1.1", func(c *Config) { c.ReceiveMaximum = 10 }, "MQTT 5 setting"},
		{"receive maximum too large", func(c *Config) { c.Protocol, c.ReceiveMaximum = 5, 65536 }, "--receive-maximum"},
		{"negative receive maximum", func(c *Config) { c.Protocol, c.ReceiveMaximum = 5, -1 }, "--receive-maximum"},
		{"protocol mix", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5:70,3:30" }, ""},
		{"protocol mix of 3.1.1", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "3.1.1:100" }, ""},
		{"protocol mix and receive maximum", func(c *Config) { c.Protocol, c.ProtocolMix, c.ReceiveMaximum = 0, "5:70,3:30", 8 }, ""},
		{"protocol and protocol mix", func(c *Config) { c.Protocol, c.ProtocolMix = 5, "5:70,3:30" }, "exclusive"},
		{"protocol mix short of 100", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5:70,3:20" }, "sum to 90"},
		{"protocol mix without shares", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5,3" }, "VERSION:PERCENT"},
		{"protocol mix with a bad share", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5:x,3:30" }, "share"},
		{"protocol mix with a zero share", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5:100,3:0" }, "share"},
		{"protocol mix with version 4", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "4:50,5:50" }, "protocol \"4\""},
		{"protocol mix with a version twice", func(c *Config) { c.Protocol, c.ProtocolMix = 0, "5:50,5:50" }, "twice"},
		{"no devices is one", func(c *Config) { c.Devices = 0 }, ""},
		{"too many devices", func(c *Config) { c.Devices = MaxDevices + 1 }, "--devices"},
		{"negative devices", func(c *Config) { c.Devices = -1 }, "--devices"},
		{"devices in the crash scenario", func(c *Config) { c.Scenario, c.ServerCmds, c.Devices = ScenarioCrash, []string{"a"}, 2 }, ""},
		{"devices in plain mode", func(c *Config) { c.Plain, c.Secret, c.Devices = true, nil, 2 }, "--plain"},
		{"devices in the drain scenario", func(c *Config) { c.Scenario, c.Devices = ScenarioDrain, 2 }, "--devices"},
		{"label with a table bar", func(c *Config) { c.Label = "a|b" }, "--label"},
		{"restart", func(c *Config) { c.Scenario, c.ServerCmds = ScenarioRestart, []string{"chatd serve"} }, ""},
		{"restart needs a server command", func(c *Config) { c.Scenario = ScenarioRestart }, "--server-cmd"},
		{"restart kills one server", func(c *Config) {
			c.Scenario, c.Broker, c.ServerCmds = ScenarioRestart, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884", []string{"a", "b"}
		}, "--server-cmd"},
		{"restart drives one URL", func(c *Config) {
			c.Scenario, c.Broker, c.ServerCmds = ScenarioRestart, "tcp://127.0.0.1:1883,tcp://127.0.0.1:1884", []string{"a"}
		}, "--broker"},
		{"restart needs messages", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Messages = ScenarioRestart, []string{"a"}, 0
		}, "--messages"},
		{"restart needs senders", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Senders = ScenarioRestart, []string{"a"}, 0
		}, "--senders"},
		{"restart needs recipients", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Recipients = ScenarioRestart, []string{"a"}, 0
		}, "--recipients"},
		{"restart: more recipients than messages", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Messages, c.Recipients = ScenarioRestart, []string{"a"}, 10, 11
		}, "--recipients"},
		{"restart: one message each", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Messages, c.Recipients = ScenarioRestart, []string{"a"}, 10, 10
		}, ""},
		{"restart with a server pid", func(c *Config) {
			c.Scenario, c.ServerCmds, c.ServerPID = ScenarioRestart, []string{"a"}, 1
		}, "exclusive"},
		{"restart needs no users", func(c *Config) {
			c.Scenario, c.ServerCmds, c.Users = ScenarioRestart, []string{"a"}, 0
		}, ""},
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

func TestRotatedBrokers(t *testing.T) {
	urls := []string{"a", "b", "c"}
	tests := []struct {
		idx  int
		want string
	}{
		{0, "a b c"},
		{1, "b c a"},
		{2, "c a b"},
		{3, "a b c"},
		{7, "b c a"},
	}
	for _, tt := range tests {
		if got := strings.Join(rotatedBrokers(urls, tt.idx), " "); got != tt.want {
			t.Errorf("rotatedBrokers(%v, %d) = %s, want %s", urls, tt.idx, got, tt.want)
		}
	}
	if got := rotatedBrokers([]string{"only"}, 5); len(got) != 1 || got[0] != "only" {
		t.Errorf("one URL: %v", got)
	}
	// The rotation must not write into the caller's slice.
	if strings.Join(urls, " ") != "a b c" {
		t.Errorf("urls changed to %v", urls)
	}
	// Over many clients every URL comes first equally often.
	first := map[string]int{}
	for i := range 300 {
		first[rotatedBrokers(urls, i)[0]]++
	}
	for _, u := range urls {
		if first[u] != 100 {
			t.Errorf("%s first for %d of 300 clients, want 100", u, first[u])
		}
	}
}
