package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// serverReadyTimeout bounds how long a started server may take to accept connections.
const serverReadyTimeout = 30 * time.Second

// readyPoll is how often a starting server's addresses are tried.
const readyPoll = 5 * time.Millisecond

// serverStopTimeout is how long a server may take to exit after SIGTERM before SIGKILL.
const serverStopTimeout = 10 * time.Second

// serverProc is a server the harness started itself, in its own process
// group so that a kill reaches any child it forks.
type serverProc struct {
	args []string
	// addrs are the MQTT addresses the process serves: it is up once
	// every one accepts TCP connections.
	addrs []string
	// nodes are the indices in run.brokers of those addresses.
	nodes []int
	log   io.Writer
	file  *os.File // the log file, when there is one
	// readyTimeout bounds how long a launch may take to accept
	// connections; 0 means serverReadyTimeout.
	readyTimeout time.Duration

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
	werr error
	// started is when the latest launch started the process, ready when
	// it then accepted connections on every address (zero until it did).
	started, ready time.Time
}

// startServers starts one server per command line and waits until each
// accepts connections. One command serves every address in addrs (the
// broker URLs' host:port); several serve one address each, in order, and
// then write their output to logPath.N, N counting from 1. They start side
// by side, because a cluster node may wait for its peers before it listens.
// On failure the servers already up are stopped.
func startServers(ctx context.Context, cmdlines []string, logPath string, addrs []string) ([]*serverProc, error) {
	if len(cmdlines) == 0 {
		return nil, errors.New("--server-cmd is empty")
	}
	if len(cmdlines) > 1 && len(cmdlines) != len(addrs) {
		return nil, fmt.Errorf("%d server commands for %d broker addresses", len(cmdlines), len(addrs))
	}
	srvs := make([]*serverProc, len(cmdlines))
	errs := make([]error, len(cmdlines))
	var wg sync.WaitGroup
	for i, cmdline := range cmdlines {
		nodes := []int{i}
		path := logPath
		if len(cmdlines) == 1 {
			nodes = make([]int, len(addrs))
			for j := range nodes {
				nodes[j] = j
			}
		} else if logPath != "" {
			path = fmt.Sprintf("%s.%d", logPath, i+1)
		}
		nodeAddrs := make([]string, len(nodes))
		for j, n := range nodes {
			nodeAddrs[j] = addrs[n]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			srvs[i], errs[i] = startServer(ctx, cmdline, path, nodeAddrs, nodes)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		var up []*serverProc
		for _, s := range srvs {
			if s != nil {
				up = append(up, s)
			}
		}
		// The start-up error says what went wrong; a failure to stop the
		// others is secondary.
		_ = stopServers(up)
		return nil, err
	}
	return srvs, nil
}

// stopServers stops every server side by side (a cluster node may linger
// on its way out while its peers are still up) and returns their errors.
func stopServers(srvs []*serverProc) []error {
	errs := make([]error, len(srvs))
	var wg sync.WaitGroup
	for i, s := range srvs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.stop()
		}()
	}
	wg.Wait()
	var out []error
	for _, err := range errs {
		if err != nil {
			out = append(out, err)
		}
	}
	return out
}

// startServer runs cmdline (split on spaces, no shell) with its output
// appended to logPath ("" discards it), and waits until every address in
// addrs accepts TCP connections.
func startServer(ctx context.Context, cmdline, logPath string, addrs []string, nodes []int) (*serverProc, error) {
	args := strings.Fields(cmdline)
	if len(args) == 0 {
		return nil, errors.New("--server-cmd is empty")
	}
	s := &serverProc{args: args, addrs: addrs, nodes: nodes, log: io.Discard}
	if logPath != "" {
		f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return nil, fmt.Errorf("server log: %w", err)
		}
		s.file, s.log = f, f
	}
	if err := s.launch(ctx); err != nil {
		s.closeLog()
		return nil, err
	}
	return s, nil
}

// launch starts the process and waits until it accepts connections.
func (s *serverProc) launch(ctx context.Context) error {
	cmd := exec.Command(s.args[0], s.args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start server %q: %w", s.args[0], err)
	}
	started := time.Now()
	done := make(chan struct{})
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.started, s.ready = started, time.Time{}
	timeout := s.readyTimeout
	s.mu.Unlock()
	if timeout <= 0 {
		timeout = serverReadyTimeout
	}
	go func() {
		err := cmd.Wait()
		s.mu.Lock()
		s.werr = err
		s.mu.Unlock()
		close(done)
	}()
	deadline := started.Add(timeout)
	pending := s.addrs
	for {
		for len(pending) > 0 {
			conn, err := net.DialTimeout("tcp", pending[0], 200*time.Millisecond)
			if err != nil {
				break
			}
			if err := conn.Close(); err != nil {
				return fmt.Errorf("close probe of %s: %w", pending[0], err)
			}
			pending = pending[1:]
		}
		if len(pending) == 0 {
			s.mu.Lock()
			s.ready = time.Now()
			s.mu.Unlock()
			return nil
		}
		select {
		case <-done:
			s.mu.Lock()
			werr := s.werr
			s.mu.Unlock()
			return fmt.Errorf("server %q exited before accepting connections on %s: %w", s.args[0], pending[0], werr)
		default:
		}
		if time.Now().After(deadline) {
			s.signal(syscall.SIGKILL)
			<-done
			return fmt.Errorf("server %q not accepting connections on %s after %s", s.args[0], pending[0], timeout)
		}
		// Polled often: the restart scenario reads its start-up time from
		// when this loop sees the port open.
		if !sleep(ctx, readyPoll) {
			s.signal(syscall.SIGKILL)
			<-done
			return fmt.Errorf("start server: %w", ctx.Err())
		}
	}
}

// pid returns the current server process ID.
func (s *serverProc) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd.Process.Pid
}

// startTimes returns when the latest launch started the process and when
// it then accepted connections (zero if it has not).
func (s *serverProc) startTimes() (started, ready time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.started, s.ready
}

// signal sends sig to the server's process group.
func (s *serverProc) signal(sig syscall.Signal) {
	s.mu.Lock()
	pid := s.cmd.Process.Pid
	s.mu.Unlock()
	// The group may already be gone; the caller waits on done either way.
	if err := syscall.Kill(-pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		fmt.Fprintf(s.log, "loadtest: signal %v to server group %d: %v\n", sig, pid, err)
	}
}

// kill SIGKILLs the server and waits until it is gone.
func (s *serverProc) kill() {
	s.signal(syscall.SIGKILL)
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	<-done
}

// restart starts the server again after a kill.
func (s *serverProc) restart(ctx context.Context) error {
	return s.launch(ctx)
}

// stop ends the server with SIGTERM, then SIGKILL if it lingers, and
// closes its log.
func (s *serverProc) stop() error {
	defer s.closeLog()
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	select {
	case <-done:
		return nil
	default:
	}
	s.signal(syscall.SIGTERM)
	t := time.NewTimer(serverStopTimeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
		s.signal(syscall.SIGKILL)
		<-done
		return fmt.Errorf("server did not exit within %s of SIGTERM; killed", serverStopTimeout)
	}
}

func (s *serverProc) closeLog() {
	if s.file != nil {
		if err := s.file.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "loadtest: close server log: %v\n", err)
		}
		s.file = nil
	}
}
