package broker

import (
	"crypto/tls"
	"fmt"
	"slices"

	"golang.org/x/time/rate"

	"github.com/chatd/chatd/config"
)

// reloadable lists the settings Reload applies to a running node; any
// other that changed waits for a restart. log.level is applied by the
// caller, which owns the logger.
var reloadable = []string{
	"log.level",
	"tls.cert_file", "tls.key_file",
	"limits.connect_rate", "limits.max_connections_per_user",
	"limits.publish_rate", "limits.publish_bytes_rate", "limits.publish_max_delay",
	"push.webhook", "events.webhook",
}

// Reloaded says what a Reload did.
type Reloaded struct {
	// Applied are the keys that changed and now have their new values.
	Applied []string
	// Restart are the keys that changed and keep their old values until
	// the next start.
	Restart []string
	// Certificate says the TLS certificate was read again (renewed in
	// place, or from new files).
	Certificate bool
}

// Reload applies to the running node what changed in cfg since it started
// (or since the last Reload) that it can take: the TLS certificate, read
// again even from unchanged files, the connection and publish limits, and
// the URLs of the push and event webhooks. Other changes, and turning a
// listener or webhook on or off, wait for a restart, as Reloaded says. An
// invalid cfg, or a certificate that does not load, changes nothing.
func (s *Server) Reload(cfg config.Config) (Reloaded, error) {
	if err := cfg.Validate(); err != nil {
		return Reloaded{}, fmt.Errorf("config: %w", err)
	}
	s.reloading.Lock()
	defer s.reloading.Unlock()
	old := s.reloaded
	var r Reloaded
	// A TLS listener open, and still configured: turning it off, like on,
	// waits for a restart.
	tlsOn := s.cert.Load() != nil && cfg.TLS.CertFile != "" && cfg.TLS.KeyFile != ""
	pushOn, eventsOn := s.push.Enabled() && cfg.Push.Webhook != "", s.events.Enabled() && cfg.Events.Webhook != ""
	for _, k := range config.Diff(old, cfg) {
		switch {
		case !slices.Contains(reloadable, k),
			(k == "tls.cert_file" || k == "tls.key_file") && !tlsOn,
			k == "push.webhook" && !pushOn,
			k == "events.webhook" && !eventsOn:
			r.Restart = append(r.Restart, k)
		default:
			r.Applied = append(r.Applied, k)
		}
	}
	next := old
	if tlsOn {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
		if err != nil {
			return Reloaded{}, fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
		}
		s.cert.Store(&cert)
		r.Certificate = true
		next.TLS.CertFile, next.TLS.KeyFile = cfg.TLS.CertFile, cfg.TLS.KeyFile
	}
	// The URLs were checked by Validate, and the senders are on: SetURL
	// cannot fail here.
	if pushOn && cfg.Push.Webhook != old.Push.Webhook {
		if err := s.push.SetURL(cfg.Push.Webhook); err != nil {
			return r, fmt.Errorf("push.webhook: %w", err)
		}
		next.Push.Webhook = cfg.Push.Webhook
	}
	if eventsOn && cfg.Events.Webhook != old.Events.Webhook {
		if err := s.events.SetURL(cfg.Events.Webhook); err != nil {
			return r, fmt.Errorf("events.webhook: %w", err)
		}
		next.Events.Webhook = cfg.Events.Webhook
	}
	l := cfg.Limits
	s.connects.SetLimit(rate.Limit(l.ConnectRate))
	s.connects.SetBurst(max(1, int(2*l.ConnectRate)))
	s.users.SetLimits(l.MaxConnectionsPerUser, l.PublishRate, l.PublishBytesRate, l.PublishMaxDelay)
	next.Limits.ConnectRate, next.Limits.MaxConnectionsPerUser = l.ConnectRate, l.MaxConnectionsPerUser
	next.Limits.PublishRate, next.Limits.PublishBytesRate, next.Limits.PublishMaxDelay = l.PublishRate, l.PublishBytesRate, l.PublishMaxDelay
	next.Log.Level = cfg.Log.Level
	// What waits for a restart keeps its old value here, so that the next
	// reload names it again.
	s.reloaded = next
	return r, nil
}
