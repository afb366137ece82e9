package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/chatd/chatd/broker"
)

const clusterStatusLong = `Ask a running cluster node for the cluster's health and print it: the
chatd nodes it hears, whether the cluster has quorum (the JetStream meta
group and every stream have a leader, so every queue can be written),
and for each Raft group its leader and its replicas: caught up or not,
how far behind, when last seen.

The node answers on its HTTP listener (GET /cluster/status), so --http is
that listener's address. The exit status is 0 with quorum and every
replica caught up, 1 on an error, 2 without quorum, 3 with quorum but a
replica behind: a rolling upgrade waits for 0 before it restarts the next
node.

  chatd cluster status --http 10.0.0.1:8080
  chatd cluster status --http 127.0.0.1:8080 --json`

// Exit statuses of chatd cluster status beyond 0 and 1.
const (
	exitNoQuorum = 2
	exitLagging  = 3
)

// exitError carries the exit status a command wants.
type exitError struct {
	code int
	msg  string
}

func (e exitError) Error() string { return e.msg }

// newClusterCmd returns chatd cluster and its subcommands.
func newClusterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Inspect a cluster",
	}
	cmd.AddCommand(newClusterStatusCmd())
	return cmd
}

func newClusterStatusCmd() *cobra.Command {
	var (
		addr    string
		asJSON  bool
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Print the cluster's nodes, quorum, and stream leaders and replicas",
		Long:  clusterStatusLong,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			st, raw, err := fetchStatus(ctx, addr)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				_, err = out.Write(raw)
			} else {
				err = printStatus(out, st)
			}
			if err != nil {
				return fmt.Errorf("write status: %w", err)
			}
			switch {
			case !st.Quorum:
				return exitError{exitNoQuorum, "no quorum: some groups have no leader"}
			case len(st.Lagging) > 0:
				return exitError{exitLagging, "replicas behind: " + strings.Join(st.Lagging, ", ")}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "http", "127.0.0.1:8080", "the node's HTTP listener, host:port")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the node's JSON answer as it is")
	cmd.Flags().DurationVar(&timeout, "timeout", 15*time.Second, "how long to wait for the answer")
	return cmd
}

// fetchStatus asks the node at addr for its ClusterStatus.
func fetchStatus(ctx context.Context, addr string) (broker.ClusterStatus, []byte, error) {
	var st broker.ClusterStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/cluster/status", nil)
	if err != nil {
		return st, nil, fmt.Errorf("--http %q: %w", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, nil, fmt.Errorf("ask %s: %w", addr, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return st, nil, fmt.Errorf("read the answer of %s: %w", addr, err)
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusServiceUnavailable {
		return st, raw, fmt.Errorf("%s answered %s: %s", addr, resp.Status, strings.TrimSpace(string(raw)))
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return st, raw, fmt.Errorf("%s answered %s: %w", addr, resp.Status, err)
	}
	if st.Node == "" {
		return st, raw, errors.New(addr + " answered without a node name: " + strings.TrimSpace(string(raw)))
	}
	return st, raw, nil
}

// printStatus writes st as tables for people.
func printStatus(w io.Writer, st broker.ClusterStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", st.Node)
	var peers []string
	for _, p := range st.Peers {
		peers = append(peers, fmt.Sprintf("%s (heard %dms ago)", p.Name, p.HeardMs))
	}
	fmt.Fprintf(tw, "peers\t%s\n", strings.Join(peers, ", "))
	fmt.Fprintf(tw, "quorum\t%v\n", st.Quorum)
	fmt.Fprintf(tw, "lagging\t%s\n\n", strings.Join(st.Lagging, ", "))
	fmt.Fprintln(tw, "GROUP\tLEADER\tMESSAGES\tREPLICAS (name: current, lag, seen)")
	for _, g := range st.Groups() {
		leader := g.Leader
		if leader == "" {
			leader = "NONE"
		}
		var reps []string
		if g.Name == "meta" && len(g.Replicas) == 0 && g.Leader != "" && g.Leader != st.Node {
			reps = append(reps, "listed by the meta leader's node, "+g.Leader)
		}
		for _, r := range g.Replicas {
			state := "current"
			switch {
			case r.Offline:
				state = "OFFLINE"
			case !r.Current:
				state = "BEHIND"
			}
			reps = append(reps, fmt.Sprintf("%s: %s, lag %d, seen %dms ago", r.Name, state, r.Lag, r.SeenMs))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\n", g.Name, leader, g.Messages, strings.Join(reps, "; "))
	}
	return tw.Flush()
}
