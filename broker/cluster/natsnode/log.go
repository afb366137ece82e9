package natsnode

import (
	"fmt"
	"log/slog"
)

// serverLogger routes nats-server's logs to slog. The server's notices
// (start-up banner, leader changes) go to info, its debug and trace lines to
// debug.
type serverLogger struct{ l *slog.Logger }

func (s serverLogger) Noticef(f string, a ...any) { s.l.Info(fmt.Sprintf(f, a...)) }
func (s serverLogger) Warnf(f string, a ...any)   { s.l.Warn(fmt.Sprintf(f, a...)) }
func (s serverLogger) Errorf(f string, a ...any)  { s.l.Error(fmt.Sprintf(f, a...)) }
func (s serverLogger) Debugf(f string, a ...any)  { s.l.Debug(fmt.Sprintf(f, a...)) }
func (s serverLogger) Tracef(f string, a ...any)  { s.l.Debug(fmt.Sprintf(f, a...)) }

// Fatalf logs at error level only: the embedding process decides whether
// to exit, not a library.
func (s serverLogger) Fatalf(f string, a ...any) { s.l.Error("fatal: " + fmt.Sprintf(f, a...)) }
