// The official Ollama JavaScript client (npm `ollama`), unmodified, against the host
// given as the first argument.  Prints one JSON object with what each call returned;
// tests/test_js_client.py checks it.
import { Ollama } from "ollama";

const ollama = new Ollama({ host: process.argv[2] });
const user = [{ role: "user", content: "hi" }];
const out = {};

const chat = await ollama.chat({ model: "llama3", messages: user });
out.chat = chat.message.content;

// Streamed, and aborted after two parts: the client walks away mid-generation.
const stream = await ollama.chat({
  model: "llama3", messages: user, stream: true,
  options: { num_predict: 50, fake_token_delay: 0.1 },
});
out.streamed = [];
try {
  for await (const part of stream) {
    out.streamed.push(part.message.content);
    if (out.streamed.length === 2) stream.abort();
  }
  out.abort = "not aborted";
} catch (error) {
  out.abort = error.name;
}

const generated = await ollama.generate({ model: "llama3", prompt: "hi" });
out.generate = generated.response;
const embedded = await ollama.embed({ model: "nomic-embed-text", input: ["a", "b"] });
out.embed = embedded.embeddings;
out.list = (await ollama.list()).models.map((m) => m.name).sort();
try {
  await ollama.chat({ model: "ghost", messages: user });
  out.missing = "no error";
} catch (error) {
  out.missing = { status: error.status_code, error: error.error };
}
console.log(JSON.stringify(out));
