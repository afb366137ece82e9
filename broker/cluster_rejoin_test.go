//go:build !race

package broker

import (
	"flag"
	"testing"
	"time"
)

var longRuns = flag.Bool("long", false, "run the long fault tests too (TestClusterSIGKILLDuringRejoin)")

// TestClusterSIGKILLDuringRejoin kills a node with SIGKILL while another
// one is still rejoining after its own SIGKILL, so that JetStream loses
// its quorum for a while: nothing PUBACKed may be lost. It is long and
// was not in the way of a defect in 30 runs, so only -long runs it: go
// test -run SIGKILLDuringRejoin -long -count 10 ./broker/.
func TestClusterSIGKILLDuringRejoin(t *testing.T) {
	if !*longRuns {
		t.Skip("a long fault test: run it with -long")
	}
	procs := clusterProcs(t, 3)
	const total = 4000
	faults := map[int]func(){
		1500: func() {
			procs[1].kill()
			time.Sleep(time.Second)
			procs[1].launch(procs[1].env...)
			if err := procs[1].waitListening(); err != nil {
				t.Error(err)
			}
			// waitListening returns as the port is bound, before the node
			// has rejoined: this kill comes while it catches up.
			procs[2].kill()
			time.Sleep(time.Second)
			procs[2].launch(procs[2].env...)
			if err := procs[2].waitListening(); err != nil {
				t.Error(err)
			}
		},
	}
	clusterLoad(t, procs, total, faults)
}
