"""The FFI surface, driven through the generated Python binding (standard library only).

Run by tests/python_bindings.rs, which generates the module, starts a real push-server with
pushes already queued for the device, and passes the details in the environment:
SDK_HOST, SDK_PORT, SDK_CA_PEM, SDK_DEVICE_ID, SDK_CREDENTIAL, SDK_MESSAGES (comma-separated
ids, in order), SDK_CALL_ID.
"""

import asyncio
import gc
import os
import plistlib
import queue
import time
import unittest

import mobile_sdk_ffi as sdk

STEP = 15.0  # seconds: bound of every wait
ENV = os.environ


NEW_INSTALL = sdk.LastSeen(epoch=0, seq=0)


def config(last_seen=NEW_INSTALL, credential=None):
    return sdk.ProviderConfig(
        host=ENV["SDK_HOST"],
        port=int(ENV["SDK_PORT"]),
        server_name="localhost",
        device_id=ENV["SDK_DEVICE_ID"],
        credential=ENV["SDK_CREDENTIAL"] if credential is None else credential,
        ca_pem=ENV["SDK_CA_PEM"],
        pins=[],
        last_seen=last_seen,
        ssid="ward-4b",
        voip_token=None,
    )


class Recorder(sdk.PushListener):
    """Collects events from the SDK's thread; the test waits on them with a timeout."""

    def __init__(self):
        self.events = queue.Queue()
        self.seen = []

    def on_event(self, event):
        self.events.put(event)

    async def wait_for(self, what, pick):
        deadline = time.monotonic() + STEP
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {STEP}s; seen: {[str(e) for e in self.seen]}")
            try:
                event = await asyncio.to_thread(self.events.get, True, min(left, 0.5))
            except queue.Empty:
                continue
            self.seen.append(event)
            picked = pick(event)
            if picked is not None:
                return picked

    async def connected(self):
        return await self.wait_for(
            "Connected",
            lambda e: e.state if e.is_STATE() and e.state.is_CONNECTED() else None,
        )

    def messages(self):
        return [e.message.id for e in self.seen if e.is_MESSAGE()]

    def persisted(self):
        return [e.last_seen for e in self.seen if e.is_LAST_SEEN_SEQ()]

    def replies(self):
        return [e.reply for e in self.seen if e.is_CALL_OUTCOME_REPLIED()]


def quiet(counters):
    return (counters.sessions, counters.tasks, counters.sockets, counters.connected) == (0, 0, 0, 0)


class FfiSurface(unittest.TestCase):
    # Persisted between tests, as the host would in its app group.
    last_seen = NEW_INSTALL

    def test_1_invalid_configuration_is_refused_up_front(self):
        with self.assertRaises(sdk.SdkError.InvalidConfig) as caught:
            sdk.PushClient(config(credential=""), Recorder())
        self.assertIn("credential", str(caught.exception))

    def test_2_queued_pushes_arrive_through_callbacks_and_are_acked(self):
        async def body():
            rec = Recorder()
            client = sdk.PushClient(config(), rec)
            self.assertEqual(client.state(), sdk.ConnectionState.IDLE())
            await client.start()
            state = await rec.connected()
            self.assertEqual(state.device_id, ENV["SDK_DEVICE_ID"])
            # A new install learns the store's epoch with the ServerHello, before any push.
            [first] = rec.persisted()
            self.assertEqual(first.seq, 0)
            self.assertNotEqual(first.epoch, 0)
            expected = ENV["SDK_MESSAGES"].split(",")
            for message_id in expected:
                message = await rec.wait_for(
                    message_id, lambda e: e.message if e.is_MESSAGE() and e.message.id == message_id else None
                )
                self.assertEqual(message.title, f"title {message_id}")
            invite = await rec.wait_for("call invite", lambda e: e.invite if e.is_CALL_INVITE() else None)
            self.assertEqual(invite.call_id, ENV["SDK_CALL_ID"])
            self.assertEqual(len(invite.call_uuid), 36)
            self.assertGreater(invite.ring_remaining_ms, 0)
            last = await rec.wait_for(
                "last seen of the invite",
                lambda e: e.last_seen if e.is_LAST_SEEN_SEQ() and e.last_seen.seq >= invite.seq else None,
            )
            self.assertEqual(last.epoch, first.epoch)
            self.assertEqual((client.last_seen().epoch, client.last_seen().seq), (last.epoch, last.seq))
            self.assertEqual(rec.messages(), expected)
            await client.stop(sdk.StopReason.HOST_REQUESTED)
            self.assertEqual(
                client.state(),
                sdk.ConnectionState.STOPPED(sdk.StopCause.HOST(sdk.StopReason.HOST_REQUESTED)),
            )
            self.assertTrue(quiet(sdk.counters()), sdk.counters())
            FfiSurface.last_seen = client.last_seen()
            del client
            gc.collect()
            self.assertEqual(sdk.counters().instances, 0)

        asyncio.run(body())

    def test_3_repeated_cycles_release_everything_and_show_nothing_twice(self):
        async def body():
            for cycle in range(25):
                rec = Recorder()
                client = sdk.PushClient(config(FfiSurface.last_seen), rec)
                await client.start()
                await client.start()  # idempotent
                await rec.connected()
                self.assertEqual(sdk.counters().sessions, 1)
                await client.stop(sdk.StopReason.HOST_REQUESTED)
                await client.stop(sdk.StopReason.HOST_REQUESTED)  # idempotent
                self.assertTrue(quiet(sdk.counters()), f"cycle {cycle}: {sdk.counters()}")
                self.assertEqual(rec.messages(), [], f"cycle {cycle} showed an old push again")
                self.assertEqual(rec.persisted(), [], f"cycle {cycle}: the persisted epoch was not kept")
                del client
                gc.collect()
                self.assertEqual(sdk.counters().instances, 0, f"cycle {cycle}")

        asyncio.run(body())

    def test_4_a_newer_instance_supersedes_the_older_one(self):
        async def body():
            older_rec, newer_rec = Recorder(), Recorder()
            older = sdk.PushClient(config(FfiSurface.last_seen), older_rec)
            newer = sdk.PushClient(config(FfiSurface.last_seen), newer_rec)
            await older.start()
            await older_rec.connected()
            await newer.start()
            await newer_rec.connected()
            superseded = sdk.ConnectionState.STOPPED(sdk.StopCause.HOST(sdk.StopReason.SUPERSEDED))
            self.assertEqual(older.state(), superseded)
            counters = sdk.counters()
            self.assertEqual((counters.instances, counters.sessions, counters.sockets), (2, 1, 1))
            with self.assertRaises(sdk.SdkError.Superseded):
                await older.start()
            await newer.stop(sdk.StopReason.HOST_REQUESTED)
            del older, newer
            gc.collect()
            self.assertTrue(quiet(sdk.counters()))
            self.assertEqual(sdk.counters().instances, 0)

        asyncio.run(body())

    def test_5_voip_push_decision_crosses_the_boundary(self):
        payload = sdk.VoipPayload(
            version=1, call_id="c1", call_uuid="5b1f0c1e-6a53-4c5e-9d0f-6c6f63616c70",
            caller_name="Dr. Okafor", caller_handle="ext 4411", video=False,
            created_at_ms=1_000, ring_deadline_ms=31_000)
        fresh = sdk.KnownCall(reported=False, cancelled=False)
        self.assertEqual(sdk.decide_voip_push(payload, None, 11_000, fresh),
                         sdk.VoipAction.REPORT(ring_for_ms=20_000))
        # Past its deadline: reported and ended when iOS insists (or says nothing), else only completed.
        self.assertEqual(sdk.decide_voip_push(payload, None, 31_000, fresh),
                         sdk.VoipAction.REPORT_AND_END(reason=sdk.EndReason.EXPIRED))
        self.assertEqual(sdk.decide_voip_push(payload, False, 31_000, fresh),
                         sdk.VoipAction.COMPLETE_ONLY(reason=sdk.EndReason.EXPIRED))
        cancelled = sdk.KnownCall(reported=False, cancelled=True)
        self.assertEqual(sdk.decide_voip_push(payload, True, 11_000, cancelled),
                         sdk.VoipAction.REPORT_AND_END(reason=sdk.EndReason.CANCELLED))

    def test_6_provider_from_plist_configuration_starts_and_stops(self):
        def provider_configuration(**overrides):
            d = {
                "host": ENV["SDK_HOST"], "port": int(ENV["SDK_PORT"]), "serverName": "localhost",
                "deviceId": ENV["SDK_DEVICE_ID"], "credential": ENV["SDK_CREDENTIAL"],
                "caCertificate": ENV["SDK_CA_PEM"], "pins": [], "matchSSIDs": [" Ward 4B ", "Station Ünfall 🚑"],
            }
            d.update(overrides)
            return plistlib.dumps({k: v for k, v in d.items() if v is not None}, fmt=plistlib.FMT_BINARY)

        class Host(sdk.ProviderHostCallbacks):
            def __init__(self):
                self.states = queue.Queue()
                self.replies = queue.Queue()
                self.persisted = []

            def report_incoming_call(self, user_info_plist):
                raise AssertionError(f"no call queued: {plistlib.loads(user_info_plist)}")

            def show_notification(self, notification):
                raise AssertionError(f"nothing queued: {notification}")

            def persist_last_seen(self, last_seen):
                self.persisted.append(last_seen)

            def state_changed(self, state):
                self.states.put(state)

            def call_outcome_replied(self, reply):
                self.replies.put(reply)

        with self.assertRaises(sdk.SdkError.InvalidConfig) as caught:
            sdk.PushProvider(provider_configuration(port=None), NEW_INSTALL, Host())
        self.assertIn('missing key "port"', str(caught.exception))
        with self.assertRaises(sdk.SdkError.InvalidConfig) as caught:
            sdk.PushProvider(provider_configuration(port=70000), NEW_INSTALL, Host())
        self.assertIn('"port" must be an integer 1-65535', str(caught.exception))

        async def body():
            host = Host()
            # The app group holds a floor numbered by another store, above what this process
            # remembers for the device (so that one does not take over).
            foreign = sdk.LastSeen(epoch=FfiSurface.last_seen.epoch + 1, seq=FfiSurface.last_seen.seq + 1)
            provider = sdk.PushProvider(provider_configuration(), foreign, host)
            await provider.start()
            deadline = time.monotonic() + STEP
            while not provider.state().is_CONNECTED():
                self.assertLess(time.monotonic(), deadline, f"not connected: {provider.state()}")
                try:  # wake on the next state change (or re-check after half a second)
                    await asyncio.to_thread(host.states.get, True, 0.5)
                except queue.Empty:
                    pass
            self.assertEqual(sdk.counters().connected, 1)
            # Persisted before the state changed: the floor kept, under this store's epoch.
            kept = (FfiSurface.last_seen.epoch, foreign.seq)
            self.assertEqual([(p.epoch, p.seq) for p in host.persisted], [kept])
            self.assertEqual((provider.last_seen().epoch, provider.last_seen().seq), kept)
            # The app group's pending file, as the app writes it; the provider hands it over and
            # the server's reply reaches the host. A decline never ends a call, whatever the result.
            pending = sdk.add_pending_call_outcome(
                b"", sdk.CallOutcomeReport(call_id=ENV["SDK_CALL_ID"], outcome=sdk.CallOutcome.DECLINED, at_ms=2))
            self.assertEqual(provider.report_pending_call_outcomes(pending), 1)
            reply = await asyncio.to_thread(host.replies.get, True, STEP)
            self.assertEqual((reply.call_id, reply.outcome), (ENV["SDK_CALL_ID"], sdk.CallOutcome.DECLINED))
            self.assertIsInstance(reply.result, sdk.CallOutcomeResult)
            provider.handle_timer_event()
            await provider.stop(4)  # NEProviderStopReason.unrecoverableNetworkChange
            self.assertEqual(
                provider.state(),
                sdk.ConnectionState.STOPPED(sdk.StopCause.HOST(sdk.StopReason.NETWORK_CHANGE)),
            )
            self.assertTrue(quiet(sdk.counters()), sdk.counters())
            del provider
            gc.collect()
            self.assertEqual(sdk.counters().instances, 0)

        asyncio.run(body())

    def test_7_call_outcomes_are_reported_and_replied(self):
        for name in ("report_call_outcome",):
            self.assertTrue(callable(getattr(sdk.PushClient, name, None)), name)
        for name in ("report_call_outcome", "report_pending_call_outcomes"):
            self.assertTrue(callable(getattr(sdk.PushProvider, name, None)), name)
        for name in ("read_pending_call_outcomes", "add_pending_call_outcome", "remove_pending_call_outcome"):
            self.assertTrue(callable(getattr(sdk, name, None)), name)

        # The app group's file: appended once per call and outcome, deleted by the reply.
        answered = sdk.CallOutcomeReport(call_id="c-1", outcome=sdk.CallOutcome.ANSWERED, at_ms=1_700_000_000_000)
        ended = sdk.CallOutcomeReport(call_id="c-1", outcome=sdk.CallOutcome.ENDED, at_ms=1_700_000_060_000)
        file = sdk.add_pending_call_outcome(b"", answered)
        file = sdk.add_pending_call_outcome(file, answered)
        file = sdk.add_pending_call_outcome(file, ended)
        self.assertEqual(sdk.read_pending_call_outcomes(file), [answered, ended])
        file = sdk.remove_pending_call_outcome(file, "c-1", sdk.CallOutcome.ANSWERED)
        self.assertEqual(sdk.read_pending_call_outcomes(file), [ended])
        self.assertEqual(sdk.read_pending_call_outcomes(b"not a plist"), [])
        with self.assertRaises(sdk.SdkError.InvalidReport):
            sdk.add_pending_call_outcome(b"", sdk.CallOutcomeReport(call_id="", outcome=sdk.CallOutcome.MISSED, at_ms=0))

        async def body():
            rec = Recorder()
            client = sdk.PushClient(config(FfiSurface.last_seen), rec)
            with self.assertRaises(sdk.SdkError.InvalidReport):
                client.report_call_outcome("", sdk.CallOutcome.ANSWERED, 0)
            # Before start: sent after the hello. The server has no outcome decisions yet and
            # may answer UNKNOWN_CALL; what matters here is that a reply names the report.
            client.report_call_outcome(ENV["SDK_CALL_ID"], sdk.CallOutcome.ANSWERED, 1)
            await client.start()
            reply = await rec.wait_for("reply to the answer", lambda e: e.reply if e.is_CALL_OUTCOME_REPLIED() else None)
            self.assertEqual((reply.call_id, reply.outcome), (ENV["SDK_CALL_ID"], sdk.CallOutcome.ANSWERED))
            self.assertIsInstance(reply.result, sdk.CallOutcomeResult)
            self.assertNotEqual(reply.result, sdk.CallOutcomeResult.UNSPECIFIED)
            # While connected: sent at once.
            client.report_call_outcome(ENV["SDK_CALL_ID"], sdk.CallOutcome.ENDED, 2)
            await rec.wait_for(
                "reply to the hang-up",
                lambda e: e.reply if e.is_CALL_OUTCOME_REPLIED() and e.reply.outcome == sdk.CallOutcome.ENDED else None,
            )
            self.assertEqual(len(rec.replies()), 2)
            await client.stop(sdk.StopReason.HOST_REQUESTED)
            del client
            gc.collect()
            self.assertTrue(quiet(sdk.counters()), sdk.counters())

        asyncio.run(body())


if __name__ == "__main__":
    unittest.main(verbosity=2)
