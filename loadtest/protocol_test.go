package loadtest

import (
	"testing"
)

// TestRunChatMQTT5 runs the chat scenario with MQTT 5 phones against
// chatd: every message once, in order, every PUBACK counted.
func TestRunChatMQTT5(t *testing.T) {
	cfg := testConfig(ScenarioChat, startChatd(t))
	cfg.Protocol = 5
	rep := runOK(t, cfg)
	assertBalanced(t, rep)
	c := rep.Counts
	if c.Sent == 0 || c.Unique != c.Sent || c.Acked != c.Sent || c.InFlight != 0 {
		t.Errorf("counts %+v: want every message PUBACKed and delivered", c)
	}
	if p := rep.Protocols; p.MQTT5 != int64(cfg.Users) || p.MQTT311 != 0 || p.GrantedMin == 0 {
		t.Errorf("protocols %+v: want %d MQTT 5 clients and a granted Receive Maximum", p, cfg.Users)
	}
}
