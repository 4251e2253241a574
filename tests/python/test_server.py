#!/usr/bin/env python3
"""qf serve end to end: the official `openai` client against a server started here, concurrent
sessions against the same requests run alone, prompt reuse, per-request compressed caches, KV
memory admission, bad input, a client that disconnects mid-stream, SIGTERM draining, and slot
save / restore of compressed states.
Everything talks to 127.0.0.1 only; every wait is bounded.
Usage: test_server.py BUILD_DIR FIXTURES_DIR"""
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import openai

BUILD = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else "build"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
QF = os.path.join(BUILD, "qf")
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURES = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else os.path.join(ROOT, "tests", "fixtures")


class Server:
    """A qf serve process on a free port; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([QF, "serve", "-m", MODEL, "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        deadline = time.time() + 60
        self.port = None
        self.log = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("qf serve did not start: " + "".join(self.log))

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", timeout=120, max_retries=0)

    def request(self, method, path, body=None, raw=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        conn.close()
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text

    def metrics(self):
        _, text = self.request("GET", "/metrics")
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^qf_(\w+) (\S+)$", text, re.M)}

    def stop(self, timeout=60):
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout=60):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.proc.stderr.close()
        return self.proc.returncode


def wait_until(pred, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


class ServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server("-np", "64", "-c", "512", "-t", "2", "--max-queued", "128")
        cls.api = cls.srv.client()

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()

    def assert_error(self, status, body, want_status, param=None):
        self.assertEqual(status, want_status, body)
        self.assertIsInstance(body, dict, body)
        self.assertIn("error", body)
        self.assertIsInstance(body["error"]["message"], str)
        self.assertTrue(body["error"]["type"])
        if param is not None:
            self.assertEqual(body["error"]["param"], param)

    def test_models_and_health(self):
        models = self.api.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL_ID])
        self.assertEqual(self.srv.request("GET", "/health"), (200, {"status": "ok"}))

    def test_long_body_sent_as_form_data_says_how_to_send_it(self):
        # curl -d labels bodies application/x-www-form-urlencoded, which the HTTP library caps at
        # 8 KiB: the 413 must say what to do; the same body as application/json is served.
        text = "the union is strong " * 1500  # 30 KB
        for content_type, want in (("application/x-www-form-urlencoded", 413), ("application/json", 200)):
            conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=120)
            conn.request("POST", "/tokenize", body=json.dumps({"content": text}).encode(),
                         headers={"Content-Type": content_type})
            r = conn.getresponse()
            body = json.loads(r.read())
            conn.close()
            self.assertEqual(r.status, want, body)
            if want == 413:
                self.assert_error(r.status, body, 413)
                self.assertIn("Content-Type: application/json", body["error"]["message"])
            else:
                self.assertGreater(len(body["tokens"]), 4000)

    def test_chat_usage_counts_match_the_tokenizer(self):
        messages = [{"role": "user", "content": "Write a long essay about the history of the ocean."}]
        r = self.api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
        _, tmpl = self.srv.request("POST", "/apply-template", {"messages": messages})
        _, toks = self.srv.request("POST", "/tokenize", {"content": tmpl["prompt"], "add_special": True})
        self.assertEqual(r.usage.prompt_tokens, len(toks["tokens"]))
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 12)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + 12)
        self.assertTrue(r.choices[0].message.content)

    def test_streaming_equals_non_streaming(self):
        for chat in (True, False):
            kw = dict(model=MODEL_ID, max_tokens=16, temperature=0)
            if chat:
                kw["messages"] = [{"role": "user", "content": "What is the capital of France?"}]
                full = self.api.chat.completions.create(**kw).choices[0].message.content
                chunks = list(self.api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
            else:
                kw["prompt"] = "The capital of France is"
                full = self.api.completions.create(**kw).choices[0].text
                chunks = list(self.api.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
            self.assertEqual(text, full)
            finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            self.assertEqual(len(finals), 1)
            self.assertEqual(chunks[-1].usage.completion_tokens, 16)

    def test_ignore_eos_generates_max_tokens(self):
        messages = [{"role": "user", "content": "Say hello."}]
        short = self.api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=200, temperature=0)
        self.assertEqual(short.choices[0].finish_reason, "stop")  # the answer ends itself
        self.assertLess(short.usage.completion_tokens, 200)
        long = self.api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=200, temperature=0,
                                                extra_body={"ignore_eos": True})
        self.assertEqual(long.choices[0].finish_reason, "length")
        self.assertEqual(long.usage.completion_tokens, 200)
        self.assertNotIn("<|im_end|>", long.choices[0].message.content)

    def test_same_seed_same_text_and_stop_strings(self):
        kw = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=24, temperature=0.9, seed=11)
        a = self.api.completions.create(**kw).choices[0].text
        b = self.api.completions.create(**kw).choices[0].text
        self.assertEqual(a, b)
        greedy = self.api.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
        text = greedy.choices[0].text
        self.assertIn(" 6", text)
        stopped = self.api.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                              stop=[" 6"])
        self.assertEqual(stopped.choices[0].finish_reason, "stop")
        self.assertEqual(stopped.choices[0].text, text[:text.index(" 6")])

    def test_concurrent_sessions_match_running_alone(self):
        prompts = [f"Question {i}: what comes after {i}? Answer:" for i in range(64)]

        def ask(p):
            return self.api.completions.create(model=MODEL_ID, prompt=p, max_tokens=8, temperature=0,
                                               extra_body={"cache_prompt": False}).choices[0].text

        alone = [ask(p) for p in prompts[:8]]
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            together = list(pool.map(ask, prompts))
        alone += [ask(p) for p in prompts[8:]]
        self.assertEqual(together, alone)

    def test_chat_continuation_reuses_the_cache(self):
        messages = [{"role": "user", "content": "Tell me a fact about the moon."}]
        first = self.api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=20, temperature=0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And one about the sun?"}]
        second = self.api.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
        cached = second.usage.prompt_tokens_details.cached_tokens
        self.assertGreaterEqual(cached, first.usage.prompt_tokens, second.usage)
        self.assertLess(cached, second.usage.prompt_tokens)

    def test_compressed_cache_per_request(self):
        r = self.api.completions.create(model=MODEL_ID, prompt="The history of the world, in brief:", max_tokens=120,
                                        temperature=0.8, seed=1,
                                        extra_body={"kv_policy": "knorm", "kv_budget": 48, "kv_window": 8})
        self.assertEqual(r.usage.completion_tokens, 120)
        _, slots = self.srv.request("GET", "/slots")
        knorm = [s for s in slots if s["kv_policy"] == "knorm"]
        self.assertTrue(knorm, slots)
        full = self.srv.request("GET", "/slots")[1]
        self.assertLess(min(s["kv_bytes_reserved"] for s in knorm),
                        max(s["kv_bytes_reserved"] for s in full if s["kv_policy"] == "none"))
        status, body = self.srv.request("POST", "/v1/completions",
                                        {"prompt": "x", "kv_policy": "qfilters", "kv_budget": 32})
        self.assert_error(status, body, 400)
        self.assertIn("--filters", body["error"]["message"])
        # Per-layer budgets per request (SmolLM2: 30 layers; the same total as a uniform 48).
        weighted = self.api.completions.create(model=MODEL_ID, prompt="The history of the world, in brief:",
                                               max_tokens=8, temperature=0,
                                               extra_body={"kv_policy": "knorm", "kv_budget": 48, "kv_window": 8,
                                                           "kv_layer_weights": [2] * 15 + [1] * 15})
        self.assertEqual(weighted.usage.completion_tokens, 8)
        status, body = self.srv.request("POST", "/v1/completions", {"prompt": "x", "kv_policy": "knorm",
                                                                    "kv_budget": 32, "kv_layer_weights": [1, 2]})
        self.assert_error(status, body, 400)
        self.assertIn("--layer-weights: 2 weights for a model of 30 layers", body["error"]["message"])

    def test_bad_input(self):
        s = self.srv
        self.assert_error(*s.request("POST", "/v1/chat/completions", raw=b"{not json"), 400)
        self.assert_error(*s.request("POST", "/v1/chat/completions", {"messages": "hi"}), 400, "messages")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}), 404, "model")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": ""}), 400, "prompt")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "word " * 600}), 400)
        self.assert_error(*s.request("POST", "/v1/completions", raw=b'{"prompt": "\xff\xfe bad"}'), 400)
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -5}), 400, "max_tokens")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**15}), 400, "max_tokens")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": [1, 10**9]}), 400, "prompt")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "hi", "temperature": "warm"}), 400, "temperature")
        self.assert_error(*s.request("POST", "/v1/completions", {"prompt": "hi", "id_slot": 999}), 400, "id_slot")
        self.assert_error(*s.request("POST", "/detokenize", {"tokens": [1, -4]}), 400, "tokens")
        self.assert_error(*s.request("GET", "/v1/nothing-here"), 404)
        self.assert_error(*s.request("POST", "/slots/0?action=save", {"filename": "x"}), 501, "action")  # no --slot-save-path
        self.assert_error(*s.request("POST", "/slots/0?action=explode"), 400, "action")
        with self.assertRaises(openai.BadRequestError):
            self.api.completions.create(model=MODEL_ID, prompt="hi", max_tokens=-1)
        # ... and the server still serves.
        ok = self.api.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, temperature=0)
        self.assertEqual(ok.usage.completion_tokens, 4)

    def test_client_disconnect_frees_the_session(self):
        before = self.srv.metrics()["requests_cancelled_total"]
        sock = socket.create_connection(("127.0.0.1", self.srv.port), timeout=30)
        body = json.dumps({"prompt": "A very long story:", "max_tokens": 400, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        sock.close()
        self.assertTrue(wait_until(lambda: self.srv.metrics()["requests_cancelled_total"] > before))
        self.assertTrue(wait_until(lambda: not any(s["is_processing"] for s in self.srv.request("GET", "/slots")[1])))
        self.assertLess(self.srv.metrics()["tokens_generated_total"], 10**9)


class SlotSaveRestoreTest(unittest.TestCase):
    """POST /slots/{id}?action=save|restore as llama.cpp's server: "compress once, ask many"."""

    DOC = ("The lighthouse keeper, Mara, kept a log of every ship that passed the northern cape. "
           "In March she recorded the Aurora, a grain ship bound for Lisbon, and the Tern, a fishing boat "
           "that lost its mast in a storm. In April the weather calmed and she painted the lamp room blue. ") * 3

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        filters = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.qfilters.safetensors")
        policy = ["--kv-policy", "qfilters", "--filters", filters] if os.path.exists(filters) else ["--kv-policy", "knorm"]
        cls.srv = Server("-np", "2", "-c", "512", "-t", "2", "--slot-save-path", cls.dir.name, *policy,
                         "--kv-budget", "64", "--kv-window", "8")

    @classmethod
    def tearDownClass(cls):
        cls.srv.stop()
        cls.dir.cleanup()

    def complete(self, prompt, slot, max_tokens, kv=None):
        status, body = self.srv.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                                     "temperature": 0, "id_slot": slot, **(kv or {})})
        self.assertEqual(status, 200, body)
        return body["choices"][0]["text"], body["usage"]

    def action(self, slot, action, filename):
        return self.srv.request("POST", f"/slots/{slot}?action={action}", {"filename": filename})

    def tokens(self, text):
        status, body = self.srv.request("POST", "/tokenize", {"content": text})
        self.assertEqual(status, 200, body)
        return body["tokens"]

    def test_round_trip_gives_the_same_continuation(self):
        # Token ids, so that the document is exactly a prefix of document + question.
        doc = self.tokens(self.DOC)
        question = self.tokens("Question: which ship lost its mast? Answer:")
        # The server's policy, and per-request ones whose states differ: attention statistics (h2o),
        # a generator (random), a full cache.
        for kv in [{}, {"kv_policy": "h2o"}, {"kv_policy": "random"}, {"kv_policy": "none"}]:
            with self.subTest(**kv):
                self.round_trip(doc, question, kv)

    def round_trip(self, doc, question, kv):
        _, usage = self.complete(doc, 0, 1, kv)
        status, saved = self.action(0, "save", "doc.qfstate")
        self.assertEqual(status, 200, saved)
        self.assertEqual((saved["id_slot"], saved["filename"], saved["n_saved"]), (0, "doc.qfstate", usage["prompt_tokens"]))
        self.assertGreater(saved["n_written"], 0)
        self.assertIn("save_ms", saved["timings"])
        # Never saved: slot 0 continues its own cache.
        want, usage = self.complete(doc + question, 0, 12, kv)
        self.assertEqual(usage["prompt_tokens_details"]["cached_tokens"], saved["n_saved"])
        # Restored into the other slot, twice (ask many): the same greedy continuation, from the cache.
        for _ in range(2):
            status, restored = self.action(1, "restore", "doc.qfstate")
            self.assertEqual(status, 200, restored)
            self.assertEqual((restored["id_slot"], restored["n_restored"]), (1, saved["n_saved"]))
            self.assertIn("restore_ms", restored["timings"])
            got, usage = self.complete(doc + question, 1, 12, kv)
            self.assertEqual(got, want)
            self.assertEqual(usage["prompt_tokens_details"]["cached_tokens"], saved["n_saved"])

    def test_corrupt_foreign_and_unsafe_files_are_refused(self):
        self.complete(self.DOC, 0, 1)
        self.assertEqual(self.action(0, "save", "good.qfstate")[0], 200)
        with open(os.path.join(self.dir.name, "good.qfstate"), "rb") as f:
            good = f.read()
        with open(os.path.join(self.dir.name, "truncated.qfstate"), "wb") as f:
            f.write(good[: len(good) // 2])
        with open(os.path.join(self.dir.name, "corrupt.qfstate"), "wb") as f:
            f.write(good[:200] + bytes([good[200] ^ 0xFF]) + good[201:])
        with open(os.path.join(self.dir.name, "garbage.qfstate"), "wb") as f:
            f.write(b"not a state file at all")
        foreign = os.path.join(self.dir.name, "foreign.qfstate")  # another model's state
        subprocess.run([QF, "run", "-m", os.path.join(FIXTURES, "llama_f32_gqa_tied.gguf"), "-p", "hello there",
                        "-n", "0", "-t", "1", "--kv-policy", "knorm", "--kv-budget", "64", "--kv-window", "8",
                        "--save-state", foreign, "--no-display-prompt"], check=True, capture_output=True, timeout=60)
        for name, words in [("truncated.qfstate", "truncated"), ("corrupt.qfstate", "checksum"),
                            ("garbage.qfstate", "not a qfilters state file"), ("foreign.qfstate", "another model")]:
            status, body = self.action(1, "restore", name)
            self.assertEqual(status, 400, body)
            self.assertEqual(body["error"]["param"], "filename")
            self.assertIn(words, body["error"]["message"])
            self.assertNotIn(self.dir.name, body["error"]["message"])  # the server's folder stays private
        for name in ["../good.qfstate", "/etc/passwd", "a/b", ".hidden", "", "..", "x\\y"]:
            status, body = self.action(1, "restore", name)
            self.assertEqual(status, 400, (name, body))
            self.assertEqual(body["error"]["param"], "filename")
        self.assertEqual(self.action(1, "restore", "missing.qfstate")[0], 404)
        self.assertEqual(self.action(7, "restore", "good.qfstate")[0], 404)
        self.assertEqual(self.srv.request("POST", "/slots/0?action=save", {"name": "x"})[0], 400)
        self.assertEqual(self.srv.request("POST", "/slots/0?action=save", raw=b"{oops")[0], 400)
        # Refused restores left slot 1 as it was, and the server keeps serving.
        text, usage = self.complete("Hello", 1, 4)
        self.assertEqual(usage["completion_tokens"], 4)
        self.assertEqual(self.action(1, "restore", "good.qfstate")[0], 200)


class AdmissionAndShutdownTest(unittest.TestCase):
    def test_kv_memory_limit_answers_503(self):
        # -c 512 full f16 cache: 512 x 30 layers x 3 heads x 64 x 2 x 2 bytes = 11.25 MiB a session.
        srv = Server("-np", "4", "-c", "512", "-t", "2", "--kv-memory", "15")
        try:
            api = srv.client()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                long_one = pool.submit(lambda: api.completions.create(model=MODEL_ID, prompt="Story:", max_tokens=200,
                                                                      temperature=0))
                self.assertTrue(wait_until(lambda: srv.metrics()["requests_processing"] >= 1))
                status, body = srv.request("POST", "/v1/completions", {"prompt": "Other", "max_tokens": 4})
                self.assertEqual(status, 503, body)
                self.assertIn("KV memory", body["error"]["message"])
                self.assertEqual(long_one.result(timeout=120).usage.completion_tokens, 200)
            # Once the first finishes, its idle session gives way to a new one.
            status, body = srv.request("POST", "/v1/completions", {"prompt": "Other", "max_tokens": 4,
                                                                     "kv_policy": "knorm", "kv_budget": 64})
            self.assertEqual(status, 200, body)
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_generation_goes_past_the_context(self):
        # -c 64: the server shifts the context (its default), so max_tokens decides; without
        # max_tokens, or with "kv_positions": "keep" and a full cache, the context does.
        srv = Server("-np", "1", "-c", "64", "-t", "2")
        try:
            api = srv.client()
            kw = dict(model=MODEL_ID, prompt="The history of the world, in brief:", temperature=0.8, seed=1)
            r = api.completions.create(max_tokens=120, **kw)
            self.assertEqual(r.usage.completion_tokens, 120, r)
            for extra in ({"kv_positions": "keep", "max_tokens": 120}, {}):
                status, body = srv.request("POST", "/v1/completions", {**kw, "model": MODEL_ID, **extra})
                self.assertEqual(status, 200, body)
                if body["choices"][0]["finish_reason"] == "length":
                    self.assertEqual(body["usage"]["total_tokens"], 65, (extra, body["usage"]))
            status, body = srv.request("POST", "/v1/completions", {"prompt": "x", "kv_positions": "rotate"})
            self.assertEqual(status, 400, body)
            self.assertIn("--kv-positions", body["error"]["message"])
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_sigterm_drains_requests_in_flight(self):
        srv = Server("-np", "2", "-c", "512", "-t", "2")
        api = srv.client()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(lambda: api.completions.create(model=MODEL_ID, prompt="Story:", max_tokens=150,
                                                                 temperature=0))
            self.assertTrue(wait_until(lambda: srv.metrics()["requests_processing"] >= 1))
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                status, _ = srv.request("POST", "/v1/completions", {"prompt": "late", "max_tokens": 2}, timeout=10)
                self.assertEqual(status, 503)
            except (ConnectionError, OSError):
                pass  # already closed: refused is fine too
            self.assertEqual(running.result(timeout=120).usage.completion_tokens, 150)
        self.assertEqual(srv.wait(60), 0)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
