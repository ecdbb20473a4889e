#include "json.h"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace edgemoe {

namespace {
[[noreturn]] void type_error(const char* want) { throw std::runtime_error(std::string("expected a JSON ") + want); }
}  // namespace

bool Json::as_bool() const {
  if (type_ != Type::Bool) type_error("boolean");
  return bool_;
}
double Json::as_double() const {
  if (type_ != Type::Number) type_error("number");
  return num_;
}
int64_t Json::as_int() const {
  if (type_ != Type::Number) type_error("number");
  if (is_int_) return int_;
  if (num_ != std::floor(num_) || std::fabs(num_) > 9.007199254740992e15) type_error("integer");
  return static_cast<int64_t>(num_);
}
const std::string& Json::as_string() const {
  if (type_ != Type::String) type_error("string");
  return str_;
}
const std::vector<Json>& Json::items() const {
  if (type_ != Type::Array) type_error("array");
  return arr_;
}
const std::vector<std::pair<std::string, Json>>& Json::members() const {
  if (type_ != Type::Object) type_error("object");
  return obj_;
}
size_t Json::size() const {
  if (type_ == Type::Array) return arr_.size();
  if (type_ == Type::Object) return obj_.size();
  type_error("array or object");
}
const Json& Json::operator[](size_t i) const {
  const auto& a = items();
  if (i >= a.size()) throw std::runtime_error("JSON array index out of range");
  return a[i];
}
const Json* Json::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  for (const auto& kv : obj_)
    if (kv.first == key) return &kv.second;
  return nullptr;
}
const Json& Json::at(const std::string& key) const {
  if (type_ != Type::Object) type_error("object");
  const Json* j = find(key);
  if (!j) throw std::runtime_error("missing key '" + key + "'");
  return *j;
}
void Json::push_back(Json v) {
  if (type_ == Type::Null) type_ = Type::Array;
  if (type_ != Type::Array) type_error("array");
  arr_.push_back(std::move(v));
}
Json& Json::operator[](const std::string& key) {
  if (type_ == Type::Null) type_ = Type::Object;
  if (type_ != Type::Object) type_error("object");
  for (auto& kv : obj_)
    if (kv.first == key) return kv.second;
  obj_.emplace_back(key, Json());
  return obj_.back().second;
}

std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

static std::string format_double(double d) {
  if (std::isnan(d)) return "NaN";  // as Python's json
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  char buf[32];
  for (int prec = 1; prec <= 17; ++prec) {  // shortest form that reads back to the same double
    std::snprintf(buf, sizeof buf, "%.*g", prec, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // a float stays a float
  return s;
}

void Json::write(std::string& out) const {
  switch (type_) {
    case Type::Null: out += "null"; break;
    case Type::Bool: out += bool_ ? "true" : "false"; break;
    case Type::Number: out += is_int_ ? std::to_string(int_) : format_double(num_); break;
    case Type::String: out += json_quote(str_); break;
    case Type::Array: {
      out += '[';
      for (size_t i = 0; i < arr_.size(); ++i) {
        if (i) out += ", ";
        arr_[i].write(out);
      }
      out += ']';
      break;
    }
    case Type::Object: {
      out += '{';
      for (size_t i = 0; i < obj_.size(); ++i) {
        if (i) out += ", ";
        out += json_quote(obj_[i].first);
        out += ": ";
        obj_[i].second.write(out);
      }
      out += '}';
      break;
    }
  }
}

std::string Json::dump() const {
  std::string out;
  write(out);
  return out;
}

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}

  Json parse_document() {
    Json v = value(0);
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error(what + " at character " + std::to_string(i_));
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool literal(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(i_, n, word) == 0) {
      i_ += n;
      return true;
    }
    return false;
  }
  Json value(int depth) {
    if (depth > 256) fail("nesting too deep");
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return Json(string());
    if (literal("true")) return Json(true);
    if (literal("false")) return Json(false);
    if (literal("null")) return Json();
    if (literal("NaN")) return Json(std::nan(""));
    if (literal("Infinity")) return Json(HUGE_VAL);
    if (literal("-Infinity")) return Json(-HUGE_VAL);
    return number();
  }
  Json number() {
    size_t start = i_;
    bool integral = true;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) fail("invalid value");
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ < s_.size() && s_[i_] == '.') {
      integral = false;
      ++i_;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      integral = false;
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    std::string text = s_.substr(start, i_ - start);
    if (integral && text.size() < 19) return Json(static_cast<int64_t>(std::strtoll(text.c_str(), nullptr, 10)));
    return Json(std::strtod(text.c_str(), nullptr));
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("bad \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') break;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated string");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }
  Json array(int depth) {
    ++i_;
    Json a = Json::array();
    ws();
    if (i_ < s_.size() && s_[i_] == ']') {
      ++i_;
      return a;
    }
    while (true) {
      a.arr_.push_back(value(depth + 1));
      ws();
      if (i_ >= s_.size()) fail("unterminated array");
      if (s_[i_] == ',') { ++i_; continue; }
      if (s_[i_] == ']') { ++i_; return a; }
      fail("expected , or ]");
    }
  }
  Json object(int depth) {
    ++i_;
    Json o = Json::object();
    ws();
    if (i_ < s_.size() && s_[i_] == '}') {
      ++i_;
      return o;
    }
    while (true) {
      ws();
      if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
      std::string key = string();
      ws();
      if (i_ >= s_.size() || s_[i_] != ':') fail("expected :");
      ++i_;
      Json v = value(depth + 1);
      bool replaced = false;  // a repeated key keeps the last value (as Python's json)
      for (auto& kv : o.obj_)
        if (kv.first == key) { kv.second = std::move(v); replaced = true; break; }
      if (!replaced) o.obj_.emplace_back(std::move(key), std::move(v));
      ws();
      if (i_ >= s_.size()) fail("unterminated object");
      if (s_[i_] == ',') { ++i_; continue; }
      if (s_[i_] == '}') { ++i_; return o; }
      fail("expected , or }");
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

Json Json::parse(const std::string& text) { return JsonParser(text).parse_document(); }

}  // namespace edgemoe
