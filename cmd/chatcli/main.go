// Command chatcli sends and receives chat messages from a shell: an
// example program on the Go client (sdk/go/chatclient), for scripts, IoT
// gateways and trying a server.
//
//	chatcli --user sensor1 --token "$(chatd token sensor1)" send alice "temperature 21.5 C"
//	chatcli --user alice --token "$(chatd token alice)" listen --read
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/chatd/chatd/sdk/go/chatclient"
)

const usage = `Usage:
  chatcli [flags] send TO TEXT   send TEXT to user TO (or to group TO with --group);
                                 exits 0 once the server stored it. It connects as a
                                 transient device (default cli-send) that receives
                                 nothing and holds nothing back
  chatcli [flags] listen         print what arrives, one JSON object per line, as a
                                 device of the user (default cli): what it has not
                                 printed when it stops comes again next time

The token comes from --token or $CHATD_TOKEN (for development:
chatd token USER). With --outbox DIR a message the server has not
stored yet survives the program's restart and goes on the next run.

Flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run is chatcli with args, writing to stdout and stderr; it returns the
// exit status: 0 done, 1 refused or failed, 2 a usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("chatcli", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	server := fs.String("server", "mqtt://127.0.0.1:1883", "chatd's MQTT URL: mqtt://, mqtts://, ws://")
	user := fs.String("user", "", "your user ID (required)")
	device := fs.String("device", "", "this device's name, the client ID being USER/DEVICE (default cli-send for send, cli for listen)")
	tok := fs.String("token", os.Getenv("CHATD_TOKEN"), "access token (default $CHATD_TOKEN)")
	outbox := fs.String("outbox", "", "directory keeping what is not yet stored across runs (default: memory)")
	group := fs.Bool("group", false, "send: TO is a group")
	read := fs.Bool("read", false, "listen: mark each message read")
	count := fs.Int("count", 0, "listen: stop after this many messages (0: until interrupted)")
	timeout := fs.Duration("timeout", 30*time.Second, "send: how long to wait for the server to store it")
	// Flags may come before and after the command and its arguments.
	var rest []string
	for more := args; ; {
		if err := fs.Parse(more); err != nil {
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		rest, more = append(rest, fs.Arg(0)), fs.Args()[1:]
	}
	if *user == "" || *tok == "" || len(rest) == 0 {
		fs.Usage()
		return 2
	}
	sending := rest[0] == "send"
	if *device == "" {
		*device = "cli"
		if sending {
			*device = "cli-send"
		}
	}
	o := chatclient.Options{Server: *server, User: *user, Device: *device, SendOnly: sending,
		Token: func(context.Context) (string, error) { return *tok, nil }}
	if *outbox != "" {
		ob, err := chatclient.NewFileOutbox(*outbox)
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		o.Outbox = ob
	}
	c, err := chatclient.Dial(o)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := c.Close(cctx); err != nil {
			fmt.Fprintln(stderr, "close:", err)
		}
	}()
	switch {
	case rest[0] == "send" && len(rest) == 3:
		return send(ctx, c, rest[1], rest[2], *group, *timeout, stdout, stderr)
	case rest[0] == "listen" && len(rest) == 1:
		return listen(ctx, c, *read, *count, stdout, stderr)
	}
	fs.Usage()
	return 2
}

// send sends text and waits until the server stored or refused it.
func send(ctx context.Context, c *chatclient.Client, to, text string, group bool, timeout time.Duration, stdout, stderr io.Writer) int {
	msg := map[string]string{"text": text}
	var id string
	var err error
	if group {
		id, err = c.SendGroup(to, msg)
	} else {
		id, err = c.Send(to, msg)
	}
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		select {
		case ev := <-c.Events():
			switch e := ev.(type) {
			case chatclient.Stored:
				if e.ID == id {
					fmt.Fprintln(stdout, "stored", id)
					return 0
				}
			case chatclient.Refused:
				if e.ID == id {
					fmt.Fprintf(stderr, "refused %s: %s\n", id, e.Code)
					return 1
				}
			}
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				fmt.Fprintf(stderr, "not stored within %v; with --outbox it goes on the next run\n", timeout)
			}
			return 1
		}
	}
}

// listen prints every event as a JSON line until count messages came or
// ctx is done.
func listen(ctx context.Context, c *chatclient.Client, read bool, count int, stdout, stderr io.Writer) int {
	enc := json.NewEncoder(stdout)
	seen := 0
	for {
		select {
		case ev := <-c.Events():
			line := map[string]any{"event": fmt.Sprintf("%T", ev)[len("chatclient."):], "data": ev}
			if err := enc.Encode(line); err != nil {
				fmt.Fprintln(stderr, err)
				return 1
			}
			m, ok := ev.(chatclient.Message)
			if !ok || m.Kind != "msg" {
				continue
			}
			if read {
				if err := c.MarkRead(m.From, m.ID); err != nil {
					fmt.Fprintln(stderr, err)
				}
			}
			if seen++; count > 0 && seen >= count {
				return 0
			}
		case <-ctx.Done():
			return 0
		}
	}
}
