// The endpoint's chat page: streams replies from this server's OpenAI-compatible /v1/chat/completions.
// Rules it keeps: the key lives only in this tab's sessionStorage and goes in the Authorization header (never a URL,
// never the console); model output reaches the page through textContent only, never as HTML; each failure the
// person can fix is one sentence in #status.
"use strict";

(() => {
  const KEY_ITEM = "finetune-phi.endpoint-key";
  const CHAT_URL = "/v1/chat/completions"; // same origin as the page: no CORS, no exposed-headers list needed
  const PIN_HEADER = "azureml-model-deployment"; // names the deployment that answered (and pins one on request)

  const SENTENCES = {
    key: "The endpoint refused the key (HTTP 401): enter the current key; `finetune-phi endpoint keys` prints it.",
    down:
      "The endpoint cannot be reached or is stopping: start it with `finetune-phi endpoint start`, " +
      "then send again.",
    busy: "The endpoint is busy (HTTP 429, too many requests in flight): wait a moment and send again.",
    timeout:
      "The reply took longer than the endpoint's request timeout (HTTP 408): ask for fewer max tokens " +
      "or send again.",
    noDeployment:
      "No deployment takes traffic, or the deployment named above does not exist (HTTP 404): " +
      "check `finetune-phi endpoint status`.",
    cut: "The stream ended before the reply finished: the endpoint may have stopped; send again.",
  };

  const $ = (id) => document.getElementById(id);
  const history = []; // the chat so far as {role, content} turns, oldest first; sent with every question
  let controller = null; // the AbortController of the reply being streamed
  let chatNumber = 0; // counts "new chat" clicks: a reply stopped by one belongs to the chat it left

  function storedKey() {
    return sessionStorage.getItem(KEY_ITEM);
  }

  function showKeyForm(show) {
    $("key-form").hidden = !show;
    $("forget-key").hidden = show;
    if (show) $("key").focus();
  }

  function setStatus(sentence) {
    $("status").textContent = sentence || "";
  }

  function setStreaming(streaming) {
    $("send").disabled = streaming;
    $("stop").disabled = !streaming;
  }

  function addMessage(role, text) {
    const box = document.createElement("div");
    box.className = `msg ${role}`;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text; // text, never HTML: a reply with <script> shows as those characters
    const meta = document.createElement("div");
    meta.className = "meta";
    box.append(body, meta);
    $("messages").append(box);
    box.scrollIntoView({ block: "end" });
    return { box, body, meta };
  }

  // Server-sent events from a fetch body: yields each event's data field (a chunk may hold part of an event).
  async function* sseData(stream) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  }

  function sentenceFor(status, message) {
    if (status === 401 || status === 403) return SENTENCES.key;
    if (status === 429) return SENTENCES.busy;
    if (status === 408 || status === 504) return SENTENCES.timeout;
    if (status === 503 || status === 502) return SENTENCES.down;
    if (status === 404) return SENTENCES.noDeployment;
    return `The endpoint answered HTTP ${status}${message ? `: ${message}` : ""}.`;
  }

  // An error event inside the stream ({"error": {code, type, message}}): the server's timeout is one of them.
  function streamSentence(error) {
    if (error.type === "timeout_error" || error.code === "RequestTimeout") return SENTENCES.timeout;
    return `The endpoint stopped the reply: ${error.message || error.code || "unknown error"}.`;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return (body.error && body.error.message) || body.detail || "";
    } catch {
      return "";
    }
  }

  function requestBody(turns) {
    const body = { model: "default", messages: turns, stream: true };
    const maxTokens = parseInt($("max-tokens").value, 10);
    const temperature = parseFloat($("temperature").value);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if (temperature >= 0) body.temperature = temperature;
    return body;
  }

  async function ask(question) {
    const key = storedKey();
    if (!key) {
      showKeyForm(true);
      return;
    }
    setStatus("");
    const chat = chatNumber;
    const turns = [...history, { role: "user", content: question }];
    const asked = addMessage("user", question);
    const reply = addMessage("assistant", "");
    reply.box.classList.add("streaming");
    controller = new AbortController();
    setStreaming(true);
    let text = "";
    let finish = null;
    let answeredBy = null;
    let failure = null;
    try {
      const headers = { Authorization: `Bearer ${key}`, "Content-Type": "application/json" };
      const pinned = $("deployment").value.trim();
      if (pinned) headers[PIN_HEADER] = pinned;
      const response = await fetch(CHAT_URL, {
        method: "POST",
        headers,
        body: JSON.stringify(requestBody(turns)),
        signal: controller.signal,
        cache: "no-store",
        credentials: "omit",
      });
      answeredBy = response.headers.get(PIN_HEADER);
      if (!response.ok) {
        failure = sentenceFor(response.status, await errorMessage(response));
        if (response.status === 401 || response.status === 403) {
          sessionStorage.removeItem(KEY_ITEM);
          showKeyForm(true);
        }
      } else {
        for await (const data of sseData(response.body)) {
          if (data === "[DONE]") break;
          const event = JSON.parse(data);
          if (event.error) {
            failure = streamSentence(event.error);
            break;
          }
          const choice = (event.choices || [])[0];
          if (!choice) continue; // the usage chunk
          if (choice.delta && choice.delta.content) {
            text += choice.delta.content;
            reply.body.textContent = text;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (!failure && !finish) failure = SENTENCES.cut;
      }
    } catch (error) {
      if (error.name === "AbortError") finish = "stopped";
      else failure = SENTENCES.down; // fetch's TypeError: nothing listens, or the connection broke
    } finally {
      controller = null;
      setStreaming(false);
      reply.box.classList.remove("streaming");
    }
    if (chat !== chatNumber) return; // "new chat" was clicked while this reply streamed: it is gone with its chat
    if (failure && !text) {
      // Nothing came back: take the exchange off the page and give the question back to send again.
      asked.box.remove();
      reply.box.remove();
      $("question").value = question;
    } else {
      reply.meta.textContent = `${answeredBy || "unknown deployment"} · finish: ${failure ? "error" : finish}`;
      if (!failure) history.push(turns[turns.length - 1], { role: "assistant", content: text });
    }
    setStatus(failure);
  }

  function newChat() {
    chatNumber += 1;
    if (controller) controller.abort();
    history.length = 0;
    $("messages").replaceChildren();
    setStatus("");
    $("question").focus();
  }

  function start() {
    $("where").textContent = `${location.host} · /v1/chat/completions`;
    showKeyForm(!storedKey());
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_ITEM, key);
      $("key").value = "";
      showKeyForm(false);
      setStatus("");
      $("question").focus();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_ITEM);
      showKeyForm(true);
    });
    $("ask-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const question = $("question").value.trim();
      if (!question || controller) return;
      $("question").value = "";
      ask(question);
    });
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => controller && controller.abort());
    $("new-chat").addEventListener("click", newChat);
  }

  start();
})();
