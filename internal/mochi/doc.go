// Package mochi holds chatd's workarounds for the bugs and gaps of mochi
// (github.com/mochi-mqtt/server/v2, pinned at v2.7.9), so that upgrading
// mochi is a change to one package. Each workaround below says what mochi
// does, the upstream issue where one is known, the tests that guard it,
// and what to check when upgrading.
//
// Some tests assert mochi's own behaviour, and their failure messages say
// that mochi "may no longer" do something: one failing after an upgrade
// means mochi changed, and the workaround it names can go or must change.
//
// To upgrade: change the version in go.mod, run
// go test -race ./internal/mochi/ ./hooks/ ./broker/..., and read the mochi
// code each "On upgrade" item names.
//
// # CONNECT deadline: Guard.Timeout
//
//   - mochi: sets no read deadline on a connection before its CONNECT is
//     read (Server.attachClient), so a silent peer holds a connection and
//     its goroutines for ever.
//   - Upstream: no upstream issue known; found by chatd's security review
//     (docs/security.md, F3).
//   - Tests: TestGuardConnectDeadline, TestGuardOnMochi; broker's
//     TestSilentConnectionIsClosed.
//   - On upgrade: check whether mochi now sets a deadline of its own before
//     CONNECT, and that the keepalive deadline it sets after CONNECT
//     (Client.refreshDeadline) still replaces ours.
//
// # Panic recovery: Guard.OnPanic
//
//   - mochi: does not recover a panic in a connection's goroutine, so one
//     malformed packet stops the whole process; v2.7.9's decoder panics on
//     an MQTT 5 SUBSCRIBE cut before its options byte.
//   - Upstream: mochi-mqtt/server#501 (closed; v2.7.9 is the commit it was
//     reported against).
//   - Tests: TestGuardRecoversPanic; broker's TestMalformedPackets and
//     TestConnectionSeatsAreGivenBack; hooks' TestAbandonEndsSession.
//   - On upgrade: keep the recovery (any panic in a decoder would still
//     stop the server). If mochi starts recovering panics itself and runs
//     OnDisconnect for them, Inbox.Abandon (hooks) would end a session
//     twice: check it.
//
// # Shutdown without GetByListener: Guard.CloseClients
//
//   - mochi: Server.Close disconnects each listener's clients through
//     Clients.GetByListener, which holds the client map's read lock and
//     takes it again in Clients.Len. A client added or deleted between the
//     two (a connect, or Registry.Forget) waits for the first, and the
//     second waits behind it: the server deadlocks.
//   - Upstream: mochi-mqtt/server#488 (open); fixes proposed in
//     mochi-mqtt/server#489 and mochi-mqtt/server#507 (open).
//   - Tests: TestGuardClose, TestForgetWhileMapIsRead (the mechanism, on
//     mochi's own Clients), TestCloseWhileClientsLeave.
//   - On upgrade: if Clients.GetByListener takes the lock once, mochi's
//     own walk is safe and CloseClients may go. The walk chatd passes is
//     DisconnectOnShutdown.
//
// # Connection ends ordered before shutdown: Ends, Guard.Ended
//
//   - mochi: adds to Listeners.ClientsWg inside each connection's goroutine
//     and waits on it in Server.Close; for a connection that never sent
//     CONNECT nothing orders the two, which the race detector reports.
//   - Upstream: the fix is proposed in mochi-mqtt/server#508 (open), which
//     moves the Add to the acceptor; mochi-mqtt/server#424 (closed) saw
//     Close hang on the same WaitGroup. mochi-mqtt/server#541 (open)
//     reports another race between Close and connections being
//     established (Listeners.Close against Listeners.Serve), which Ends
//     does not address.
//   - And a connection accepted just before Server.Close has its Add come
//     while Close may already wait on ClientsWg at zero (seen once in CI,
//     TestServe, under -race): Guard.Clients and Ends.Admit count each
//     connection under Ends' mutex before its establish runs, and the
//     server's Ends.Shut before mochi's Close refuses any later one, so
//     every Add is ordered before the Wait or made while the count is
//     above zero. Test: TestGuardAdmitsBeforeShut.
//   - Tests: TestGuardEndsOrdersClose; the race detector on broker's tests
//     that close a server with connections open.
//   - On upgrade: if ClientsWg.Add happens before the connection's
//     goroutine starts, Ends, Guard.Clients and Server.close's Ends.Shut
//     (broker) can go.
//
// # Connection ends mochi's hooks miss: Guard.OnEnd
//
//   - mochi: runs no OnDisconnect for a client admitted by OnConnect whose
//     CONNACK cannot be written (Server.attachClient returns first, leaving
//     the client in Server.Clients even with a clean session), nor for a
//     connection whose serving panicked.
//   - Upstream: no upstream issue known; found by chatd's accounting of
//     connection seats (hooks' Auth.Ended).
//   - Tests: TestGuardOnEndAfterFailedConnack, TestGuardRecoversPanic;
//     hooks' TestAuthSeatReleased and TestAdmittedClientForgottenOnce.
//   - On upgrade: if TestGuardOnEndAfterFailedConnack reports that mochi
//     ran OnDisconnect, Auth.Ended becomes a second, harmless end (it
//     forgets once), and Registry's note on such clients can go.
//
// # Closed persistent sessions: Registry
//
//   - mochi: keeps a disconnected persistent client, and its subscriptions,
//     in Server.Clients and its topic tree until its session expires
//     (by design: mochi-mqtt/server#199); chatd keeps the device's queue
//     and subscription itself, for device_ttl. Clients has no
//     compare-and-delete, and a newer connection of the same client ID may
//     be added at any moment.
//   - mochi: answers Session Present = 1 only for a client ID it still
//     holds, so Registry keeps a compact record of each session it removes
//     (user, filters and their options, expiry), resumes it in Establish,
//     and the Inbox hook sets the flag in OnPacketEncode and restores the
//     subscriptions with Restore, as inheritClientSession would.
//   - Upstream: no bug; the design is explained in mochi-mqtt/server#199
//     (closed).
//   - Tests: TestRegistryKeepsSessions, TestRegistryDropDuringConnection,
//     TestRegistrySweepsExpired, TestRegistryRecordSize; broker's
//     TestSessionPresentOnResume and TestSessionPresentZero;
//     TestRegistryForget, TestRegistryOnMochi (its "mochi alone"
//     rows record mochi's behaviour), TestRegistryTakeoverKeepsNewer,
//     TestRegistryRapidReconnects, TestRegistryKeepsClientsWhileClosing,
//     TestForgetWhileMapIsRead; hooks' TestDisconnectForgetsClient and
//     TestTakeoverKeepsNewerClient; broker's
//     TestReconnectRaceKeepsNewestRegistered.
//   - On upgrade: check in Server.attachClient that OnSessionEstablish
//     still runs before inheritClientSession and Clients.Add, that mochi
//     still removes a clean session itself after OnDisconnect, and what
//     Client.IsTakenOver and Server.UnsubscribeClient do; that SendConnack
//     still writes the CONNACK through WritePacket (OnPacketEncode) and
//     OnSessionEstablished still runs after it; that inheritClientSession
//     still restores subscriptions as Restore does (Topics.Subscribe,
//     State.Subscriptions.Add, Info.Subscriptions). If mochi gains a way
//     to keep sessions compactly, or to answer Session Present from a
//     hook, the records can go.
//
// # Writes of chatd's own packets: Conn
//
//   - mochi: Client.WritePacket sets no write deadline, and its outbound
//     queue (the only other way to write) copies every packet and has no
//     deadline either, so a client that stops reading holds its writer for
//     ever. WritePacket writes under the client's embedded lock, taken
//     since mochi-mqtt/server#212, which Conn takes too.
//   - Upstream: no upstream issue known for the missing write timeout;
//     found by chatd's TestWriteTimeoutDisconnects (broker). Related:
//     mochi-mqtt/server#95 (closed), a slow client holding up the broker.
//   - Tests: TestWriteProgressing, TestConnWriteTimeout,
//     TestConnServesSteadyReader, TestConnKeepsPacketBoundaries,
//     TestConnWithoutConnection; broker/msgpath/wire's
//     TestWriteTimeoutClosesConnection and TestSlowReaderIsServed;
//     broker's TestWriteTimeoutDisconnects and TestSlowConsumer.
//   - On upgrade: check that WritePacket still writes to Client.Net.Conn
//     under Client.Lock (not a lock of its own) and sets no write deadline
//     that Conn's clearing of the deadline would undo.
//
// # Packets kept out of logs: QuietPackets
//
//   - mochi: logs whole packets under the attribute keys "pk" and "packet"
//     (such as "error processing packet" and WriteLoop's "failed publishing
//     packet"), passwords and messages included.
//   - Upstream: no upstream issue known; found by chatd's security review
//     (docs/security.md, F5).
//   - Tests: TestQuietPackets.
//   - On upgrade: search mochi's log calls for other keys holding a packet.
//
// # Workarounds elsewhere
//
// These live with the code they serve, outside this package:
//
//   - hooks/inbox.go, Inbox.OnPacketRead: mochi downgrades a QoS 2 PUBLISH
//     to the Maximum QoS of 1, stores it and answers with a PUBACK, which
//     a QoS 2 sender takes for a protocol error; the hook ends the
//     connection instead (DISCONNECT 0x9B on MQTT 5). No upstream issue
//     known; tests: hooks' TestQoS2PublishEndsConnection, broker's
//     TestQoS2PublishRefused.
//   - hooks/inbox.go, Inbox.OnPacketRead: mochi drops a PUBLISH to a topic
//     it reserves ($SYS/..., $share...) before OnPublish, without a PUBACK;
//     the hook has the message path answer it. No upstream issue known;
//     tests: hooks' TestReservedTopicAnswered, broker's
//     TestReservedTopicPublishesAnswered.
//   - hooks/inbox.go, Inbox.Abandon, and broker/server.go, Server.guard's
//     OnPanic: the session of a connection whose serving panicked, which
//     mochi ends without OnDisconnect. Tests: hooks' TestAbandonEndsSession.
//   - hooks/auth.go, Auth.Ended (Guard.OnEnd) and Auth.OnConnect's own
//     release of a refused client's seat: mochi runs no hook after
//     refusing a client or failing its CONNACK. Tests: hooks'
//     TestAuthSeatReleased.
//   - broker/server.go, Server.close: the shutdown order (Inbox.Closing,
//     Ends.Pass, then mochi's Close, then a wait on its ClientsWg).
package mochi
